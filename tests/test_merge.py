"""`moram merge`: union with provenance, deduplication, name clashes, --tasks, refusals, and pruning by gate mass."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import yaml
from typer.testing import CliRunner

from conftest import random_bank, snapshot
from moram_cli.cli import app
from moram_cli.store import MemoryStore
from test_errors import fails_cleanly

runner = CliRunner()


def moram_json(*args) -> dict:
    result = runner.invoke(app, [*(str(a) for a in args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def make_store(tmp_path, tiny_model_dir):
    """`make_store(name, {task: seed}, *init flags)`: a store on the tiny model with one random 4-rank bank per task."""

    def make(name: str, tasks: dict[str, int], *flags: str):
        path = tmp_path / name
        # Token routing: banks added without learn-task carry no task prototypes.
        assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "4", "--k", "3", "--routing", "token", *flags]).exit_code == 0
        store = MemoryStore.open(path)
        for task, seed in tasks.items():
            store.add_bank(task, random_bank(4, seed), {"examples": seed})
        return path

    return make


@pytest.fixture
def two(make_store):
    return make_store("a", {"one": 1, "two": 2}), make_store("b", {"three": 3})


def meta(store, bank: str) -> dict:
    return yaml.safe_load((store / "banks" / bank / "bank.yaml").read_text())


def test_union_keeps_source_order_bytes_and_provenance(two, tmp_path):
    a, b = two
    before = snapshot(a), snapshot(b)
    result = moram_json("merge", tmp_path / "out", a, b)
    out = tmp_path / "out"
    assert [x["bank"] for x in result["banks"]] == ["001-one", "002-two", "003-three"] and result["deduplicated"] == 0
    assert result["banks"][2]["from"] == str((b / "banks" / "001-three").resolve())
    assert meta(out, "003-three")["merged_from"] == {"store": str(b.resolve()), "index": 1, "name": "three"}
    assert meta(out, "003-three")["examples"] == 3 and meta(out, "003-three")["index"] == 3
    source = (b / "banks" / "001-three" / "weights.safetensors").read_bytes()
    assert (out / "banks" / "003-three" / "weights.safetensors").read_bytes() == source
    assert MemoryStore.open(out).config.adapter == replace(MemoryStore.open(a).config.adapter, routing="source")
    assert moram_json("verify", out)["ok"]
    assert (snapshot(a), snapshot(b)) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_identical_banks_are_stored_once(two, tmp_path):
    a, _ = two
    shutil.copytree(a, tmp_path / "copy")
    for i, sources in enumerate([(a, a), (a, tmp_path / "copy")]):
        result = moram_json("merge", tmp_path / f"out{i}", *sources)
        assert [x["task"] for x in result["banks"]] == ["one", "two"] and result["deduplicated"] == 2


def test_a_clashing_task_name_with_other_weights_gets_a_suffix(make_store, tmp_path):
    a, b = make_store("a", {"task": 1}), make_store("b", {"task": 2, "task-2": 3})
    result = moram_json("merge", tmp_path / "out", a, b)
    assert [x["bank"] for x in result["banks"]] == ["001-task", "002-task-2", "003-task-2-2"]
    assert meta(tmp_path / "out", "002-task-2")["merged_from"]["name"] == "task"


def test_tasks_picks_banks_by_name(two, tmp_path):
    a, b = two
    assert [x["task"] for x in moram_json("merge", tmp_path / "out", a, b, "--tasks", "three,one")["banks"]] == ["one", "three"]
    message = fails_cleanly(["merge", tmp_path / "out2", a, b, "--tasks", "one,nine"], a, "no bank of task 'nine'")
    assert "available: one, three, two" in message and not (tmp_path / "out2").exists()


def _edit_config(store, change) -> None:
    config = yaml.safe_load((store / "store.yaml").read_text())
    change(config)
    (store / "store.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("what, flags, change", [
    ("base-model fingerprint", (), lambda c: c["base_model"].update(fingerprint="0" * 64)),
    ("target modules", ("--target-modules", "q_proj,v_proj"), None),
    ("gate budget k", ("--k", "5"), None),
    ("gate temperature", ("--temperature", "0.5"), None),
    ("method", (), lambda c: c.update(method="lora")),
])
def test_stores_that_do_not_fit_together_are_refused(make_store, tmp_path, what, flags, change):
    a = make_store("a", {"one": 1})
    b = make_store("b", {"two": 2} if change else {}, *flags)
    if change:
        _edit_config(b, change)
    before = snapshot(b)
    message = fails_cleanly(["merge", tmp_path / "out", a, b], a, what)
    assert str(a) in message and str(b) in message
    assert snapshot(b) == before and not (tmp_path / "out").exists()


def test_settings_that_may_differ_come_from_the_first_store(make_store, tmp_path):
    a, b = make_store("a", {"one": 1}), make_store("b", {"two": 2}, "--r", "2", "--threshold", "0.1", "--dropout", "0.1")
    moram_json("merge", tmp_path / "out", b, a)
    config = MemoryStore.open(tmp_path / "out").config
    assert (config.adapter.r, config.adapter.threshold, config.adapter.dropout) == (2, 0.1, 0.1)


def test_a_bank_of_another_shape_or_corrupt_weights_is_refused(make_store, tmp_path):
    a, b = make_store("a", {"one": 1}), make_store("b", {})
    wide = {m: (A.repeat(1, 2), B) for m, (A, B) in random_bank(4, 2).items()}
    MemoryStore.open(b).add_bank("wide", wide, {})
    fails_cleanly(["merge", tmp_path / "out", a, b], a, "k_proj has (in, out) sizes (64, 16), but (32, 16)")
    weights = a / "banks" / "001-one" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    fails_cleanly(["merge", tmp_path / "out", a], a, "001-one: bank weights are missing or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_out_must_be_new_or_empty(two, tmp_path):
    a, b = two
    fails_cleanly(["merge", b, a], b, "already exists and is not empty")
    (tmp_path / "empty").mkdir()
    assert len(moram_json("merge", tmp_path / "empty", a)["banks"]) == 2


def test_merged_store_loads_and_evaluates(two, tmp_path, tiny_task):
    moram_json("merge", tmp_path / "out", *two)
    result = moram_json("eval", tmp_path / "out", "--data", tiny_task.test)
    assert result["banks"] == ["001-one", "002-two", "003-three"] and result["total"] == 12


def test_prune_drops_rarely_gated_ranks_and_the_pruned_store_still_works(two, tmp_path, tiny_task):
    a, b = two
    before = snapshot(a), snapshot(b)
    # Token routing, so that the pruned store can still learn a task (tested at the end).
    result = moram_json("merge", tmp_path / "out", a, b, "--prune-below", "0.1", "--data", tiny_task.train, "--eval-data", tiny_task.test,
                        "--routing", "token")
    prune, out = result["prune"], tmp_path / "out"
    assert prune["ranks_before"] == 3 * 4 * 4 and 0 < prune["ranks_dropped"] < prune["ranks_before"]
    assert sum(prune["dropped_per_bank"].values()) == prune["ranks_dropped"]
    assert prune["eval"]["total"] == 12 and prune["eval"]["change"] == prune["eval"]["accuracy_after"] - prune["eval"]["accuracy_before"]
    stats = moram_json("inspect-ranks", out)
    assert stats["totals"]["ranks"] == prune["ranks_before"] - prune["ranks_dropped"]
    # Pruning is per module, so one bank's modules end up with different rank counts.
    assert len({module["ranks"] for bank in stats["banks"] for module in bank["modules"].values()}) > 1
    for bank, dropped in prune["dropped_per_bank"].items():
        info = meta(out, bank)
        if dropped:
            assert info["pruned"]["ranks_before"] - info["pruned"]["ranks_after"] == dropped
            assert info["weights_sha256"] != info["pruned"]["weights_sha256_before"]
    assert moram_json("verify", out)["ok"] and moram_json("eval", out, "--data", tiny_task.test)["total"] == 12
    assert moram_json("learn-task", out, "--data", tiny_task.train, "--name", "next", "--epochs", "0.2")["steps"] == 1
    assert (snapshot(a), snapshot(b)) == before


def test_a_bank_with_no_ranks_left_in_a_module_still_loads(make_store, tiny_task):
    store = make_store("a", {"one": 1})
    emptied = {m: (A[:0], B[:, :0]) if "layers.0.self_attn.q_proj" in m else (A, B) for m, (A, B) in random_bank(2, 2).items()}
    MemoryStore.open(store).add_bank("two", emptied, {})
    assert moram_json("eval", store, "--data", tiny_task.test)["banks"] == ["001-one", "002-two"]


def test_prune_flags_must_go_together(two, tmp_path, tiny_task):
    a, _ = two
    fails_cleanly(["merge", tmp_path / "out", a, "--prune-below", "0.1"], a, "--prune-below needs --data")
    fails_cleanly(["merge", tmp_path / "out", a, "--data", tiny_task.train], a, "go with --prune-below")
    fails_cleanly(["merge", tmp_path / "out", a, "--prune-below", "1.5", "--data", tiny_task.train], a, "out of range")
    fails_cleanly(["merge", tmp_path / "out", a, "--prune-below", "0.1", "--data", tmp_path / "no.jsonl"], a, "data file not found")
    assert not (tmp_path / "out").exists()
