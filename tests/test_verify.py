"""`moram verify`, and what a normal load says about the same damage."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import random_bank
from moram_cli.cli import app
from moram_cli.hashing import sha256_file
from moram_cli.store import MemoryStore
from moram_cli.store.lock import store_lock

runner = CliRunner()


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    """A store of the tiny model holding banks 001-one and 002-two, written without training."""
    path = tmp_path / "store"
    # Token routing: banks added without learn-task carry no task prototypes.
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "2", "--routing", "token"]).exit_code == 0
    opened = MemoryStore.open(path)
    for seed, name in enumerate(("one", "two")):
        opened.add_bank(name, random_bank(2, seed), {"examples": 3})
    return path


@pytest.fixture
def test_data(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "test.jsonl", [{"prompt": "river?", "completion": "alpha"}] * 2)


def moram(*args):
    return runner.invoke(app, [str(a) for a in args])


def failure(result) -> str:
    message = result.stderr.strip()
    assert result.exit_code == 2 and message.startswith("error: ") and "\n" not in message, result.output
    assert "Traceback" not in result.output
    return message


def verify_json(store) -> dict:
    result = moram("verify", store, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == (0 if report["ok"] else 2), result.output
    return report


def rewrite_weights(bank, tensors: dict) -> None:
    """Replace a bank's weights and record their hash, as a bank made that way would have."""
    weights = bank / "weights.safetensors"
    save_file(tensors, str(weights))
    edit_metadata(bank, weights_sha256=sha256_file(weights))


def edit_metadata(bank, **changes) -> None:
    meta = yaml.safe_load((bank / "bank.yaml").read_text())
    (bank / "bank.yaml").write_text(yaml.safe_dump({k: v for k, v in {**meta, **changes}.items() if v is not None}))


def test_a_sound_store_passes(store):
    report = verify_json(store)
    assert report["ok"] and report["problems"] == [] and report["warnings"] == [] and report["format_version"] == 1
    assert [(b["bank"], b["task"], b["experts"], b["modules"], b["ok"]) for b in report["banks"]] == [
        ("001-one", "one", 8, 4, True), ("002-two", "two", 8, 4, True)]
    table = moram("verify", store)
    assert table.exit_code == 0 and "001-one" in table.stdout and "OK" in table.stdout


def truncate(weights):
    weights.write_bytes(weights.read_bytes()[:100])


def flip_a_bit(weights):
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))


def as_pickle(weights):
    """A pickle under the safetensors name, with a matching recorded hash: loading must refuse, never unpickle."""
    weights.write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj.A": [[0.0]]}))
    edit_metadata(weights.parent, weights_sha256=sha256_file(weights))


DAMAGE = {
    "truncated weights": (truncate, "002-two: bank weights are missing or corrupt (sha256 mismatch)"),
    "bit-flipped weights": (flip_a_bit, "002-two: bank weights are missing or corrupt (sha256 mismatch)"),
    "missing weights": (lambda w: w.unlink(), "002-two: bank weights are missing or corrupt"),
    "missing bank.yaml": (lambda w: (w.parent / "bank.yaml").unlink(), "002-two/bank.yaml: bank metadata is missing"),
    "pickle as safetensors": (as_pickle, "002-two: bank weights cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_bank_is_named_by_verify_and_by_eval(store, test_data, damage):
    harm, expected = DAMAGE[damage]
    harm(store / "banks" / "002-two" / "weights.safetensors")
    assert expected in failure(moram("verify", store))
    assert expected in failure(moram("eval", store, "--data", test_data))
    report = verify_json(store)
    assert [b["ok"] for b in report["banks"]] == [True, False] and expected in report["problems"][0]


def test_metadata_that_disagrees_with_its_directory(store):
    edit_metadata(store / "banks" / "001-one", task="other", index=7, weights_sha256=None)
    problems = verify_json(store)["problems"]
    assert len(problems) == 3 and all("001-one/bank.yaml: " in p and "restore the bank from a backup" in p for p in problems)
    assert "task is 'other' but the directory says 'one'" in problems[0] and "index is 7" in problems[1]
    assert "weights_sha256 is missing" in problems[2]
    assert failure(moram("verify", store)).endswith("(+2 more: moram verify --json lists them all)")


def test_a_missing_bank_breaks_the_numbering(store):
    shutil.move(store / "banks" / "002-two", store / "banks" / "003-two")
    edit_metadata(store / "banks" / "003-two", index=3)
    problems = verify_json(store)["problems"]
    assert len(problems) == 1 and "003-two: numbered 003 where bank 002 should be" in problems[0]


def test_an_entry_of_banks_that_is_no_bank(store):
    (store / "banks" / "002 two").mkdir()
    (store / "banks" / "notes.txt").write_text("x")
    problems = verify_json(store)["problems"]
    assert len(problems) == 2 and all("not a bank (bank directories are named NNN-task)" in p for p in problems)


def flat(tensors: dict) -> dict:
    return {f"{module}.{t}": x for module, ab in tensors.items() for t, x in zip("AB", ab)}


def test_shapes_that_do_not_fit_within_or_across_banks(store):
    rewrite_weights(store / "banks" / "002-two", flat({m: (torch.zeros(2, 48), B) for m, (A, B) in random_bank(2, 1).items()}))
    opened = MemoryStore.open(store)
    opened.add_bank("three", {m: ab for m, ab in random_bank(2, 2).items() if "k_proj" not in m}, {})
    opened.add_bank("four", {**random_bank(2, 3), "model.layers.0.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 3))}, {})
    problems = verify_json(store)["problems"]
    assert len(problems) == 3
    assert "002-two: model.layers.0.self_attn.k_proj maps 48 -> 16 features but in 001-one 32 -> 16" in problems[0]
    assert "003-three: adapts other modules than 001-one (e.g. model.layers.0.self_attn.k_proj)" in problems[1]
    assert all("made for another model or store: remove it" in p for p in problems[:2])
    assert "004-four: model.layers.0.self_attn.q_proj has shapes A(2, 32) B(32, 3), not A(r, d_in) B(d_out, r)" in problems[2]


def test_values_that_are_not_finite(store):
    tensors = random_bank(2, 0)
    tensors["model.layers.1.self_attn.k_proj"][1][0, 0] = float("nan")
    rewrite_weights(store / "banks" / "001-one", flat(tensors))
    assert "model.layers.1.self_attn.k_proj holds values that are not finite numbers" in failure(moram("verify", store))


def test_weights_in_a_dtype_numpy_lacks_are_read_through_torch(store):
    """verify reads weights with numpy, which has no bfloat16: such a bank is as sound as before; integer values are not."""
    rewrite_weights(store / "banks" / "002-two", flat({m: (A.bfloat16(), B.bfloat16()) for m, (A, B) in random_bank(2, 1).items()}))
    assert verify_json(store)["ok"]
    rewrite_weights(store / "banks" / "001-one", flat({m: (A, B.int()) for m, (A, B) in random_bank(2, 0).items()}))
    assert "holds values that are not finite numbers" in failure(moram("verify", store))


def test_leftovers_and_a_lock_are_warnings(store):
    (store / ".staging" / "bank-0123").mkdir()
    with store_lock(store, "moram learn-task"):
        report = verify_json(store)
        assert report["ok"] and len(report["warnings"]) == 2
        assert "bank-0123: left over from an interrupted write" in report["warnings"][0]
        assert "store is locked by pid" in report["warnings"][1]
        shown = moram("verify", store).stdout
        # Below the table, one each; rich wraps long temporary paths wherever the terminal width falls.
        assert shown.count("warning: ") == 2 and shown.rindex("└") < shown.index("warning: ")
        assert "left over from an interrupted write" in " ".join(shown.split())


def test_a_newer_store_format_and_a_missing_store(store, tmp_path):
    config = yaml.safe_load((store / "store.yaml").read_text())
    (store / "store.yaml").write_text(yaml.safe_dump({**config, "format_version": 2}))
    assert "newer than this moram understands (1); upgrade moram" in failure(moram("verify", store))
    assert "not a moram store" in failure(moram("verify", tmp_path / "nowhere"))
