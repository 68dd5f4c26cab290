"""Every user-facing failure: one line on stderr naming the file and the fix, exit code 2, store unchanged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import snapshot
from moram_cli.cli import app
from moram_cli.hashing import sha256_file

runner = CliRunner()


def fails_cleanly(args: list, store=None, expect: str = "") -> str:
    """Run a command that must fail; check the contract and return the message."""
    before = snapshot(store) if store is not None and store.exists() else None
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in result.output, result.output
    assert expect in message, message
    if before is not None:
        assert snapshot(store) == before
    return message


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    path = tmp_path / "store"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "2"]).exit_code == 0
    return path


@pytest.fixture
def trained(store, tiny_task):
    result = runner.invoke(app, ["learn-task", str(store), "--data", str(tiny_task.train), "--epochs", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    return store


def test_missing_data_file(store, tmp_path):
    fails_cleanly(["learn-task", store, "--data", tmp_path / "nope.jsonl"], store, "nope.jsonl: data file not found")


def test_invalid_json_names_the_line(store, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, "{oops"])
    fails_cleanly(["learn-task", store, "--data", data], store, "bad.jsonl:2: invalid JSON")


def test_line_without_required_fields(store, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "fields.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "only"}])
    fails_cleanly(["learn-task", store, "--data", data], store, "fields.jsonl:2: missing field 'completion'")


def test_empty_data_file(store, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    fails_cleanly(["eval", store, "--data", tmp_path / "empty.jsonl"], store, "empty.jsonl")


def test_store_not_found(tmp_path, tiny_task):
    message = fails_cleanly(["eval", tmp_path / "missing", "--data", tiny_task.test], expect="not a moram store")
    assert "moram init" in message


def test_init_on_existing_store(store, tiny_model_dir):
    fails_cleanly(["init", store, "--base-model", tiny_model_dir], store, "already exists and is not empty")


def test_init_with_missing_parent_or_base_model(tmp_path, tiny_model_dir):
    fails_cleanly(["init", tmp_path / "a" / "b", "--base-model", tiny_model_dir], expect="parent directory does not exist")
    fails_cleanly(["init", tmp_path / "s", "--base-model", tmp_path / "nowhere"], expect="base model not found")
    assert not (tmp_path / "s").exists()


def test_base_model_that_changed_or_vanished(store, tiny_model_dir, tiny_task, tmp_path):
    moved = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, moved)
    other = tmp_path / "store2"
    assert runner.invoke(app, ["init", str(other), "--base-model", str(moved)]).exit_code == 0
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("32", "48", 1))
    fails_cleanly(["eval", other, "--data", tiny_task.test], other, "changed since the store was created")
    shutil.rmtree(moved)
    fails_cleanly(["learn-task", other, "--data", tiny_task.train], other, "is missing")


def test_base_model_that_cannot_be_loaded(tmp_path, tiny_model_dir, tiny_task):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    store = tmp_path / "s"
    assert runner.invoke(app, ["init", str(store), "--base-model", str(broken)]).exit_code == 0
    fails_cleanly(["eval", store, "--data", tiny_task.test], store, "cannot load base model")


def test_bank_whose_shapes_do_not_match_the_model(trained, tiny_task):
    bank = next((trained / "banks").iterdir())
    weights = bank / "weights.safetensors"
    save_file({f"model.layers.{i}.self_attn.{m}.{t}": torch.zeros((2, 7) if t == "A" else (7, 2))
               for i in range(2) for m in ("q_proj", "k_proj") for t in "AB"}, str(weights))
    meta = yaml.safe_load((bank / "bank.yaml").read_text())
    (bank / "bank.yaml").write_text(yaml.safe_dump({**meta, "weights_sha256": sha256_file(weights)}))
    fails_cleanly(["eval", trained, "--data", tiny_task.test], trained, "belongs to another base model")


def test_corrupt_bank_weights(trained, tiny_task):
    weights = next((trained / "banks").iterdir()) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    fails_cleanly(["learn-task", trained, "--data", tiny_task.train, "--name", "b"], trained, "corrupt")


def test_unsafe_or_duplicate_task_name(trained, tiny_task):
    fails_cleanly(["learn-task", trained, "--data", tiny_task.train, "--name", "../../x"], trained, "invalid task name")
    fails_cleanly(["learn-task", trained, "--data", tiny_task.train, "--name", "tiny_task0"], trained, "already in the store")


def test_upto_out_of_range(trained, tiny_task):
    fails_cleanly(["eval", trained, "--data", tiny_task.test, "--upto", "5"], trained, "out of range")


def test_newer_store_format(store, tiny_task):
    config = yaml.safe_load((store / "store.yaml").read_text())
    (store / "store.yaml").write_text(yaml.safe_dump({**config, "format_version": 99}))
    fails_cleanly(["eval", store, "--data", tiny_task.test], store, "upgrade moram")


def test_ctrl_c_during_training_leaves_the_store_unchanged(store, tiny_task, monkeypatch):
    import moram_cli.training.loop as learn

    def interrupted(model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(learn, "completion_loss", interrupted)
    before = snapshot(store)
    result = runner.invoke(app, ["learn-task", str(store), "--data", str(tiny_task.train)])
    assert result.exit_code == 130 and "store is unchanged" in result.stderr
    assert snapshot(store) == before


def test_training_settings_that_cannot_train(store, tiny_task):
    fails_cleanly(["learn-task", store, "--data", tiny_task.train, "--lr", "0"], store, "invalid training settings")
    fails_cleanly(["learn-task", store, "--data", tiny_task.train, "--batch-size", "0"], store, "invalid training settings")


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(directory)`: writes into it fail as on a read-only mount.

    chmod where it binds; as root, which chmod does not stop, os.open and
    os.mkdir fail with EROFS for anything created directly inside it.
    """
    locked = []

    def make(directory: Path) -> None:
        if os.geteuid() != 0:
            directory.chmod(0o555)
            locked.append(directory)
            return
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(path) -> None:
            if Path(path).parent == directory:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        def guarded_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_open(path, flags, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            refuse(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)

    yield make
    for directory in locked:
        directory.chmod(0o755)


def test_init_into_a_read_only_directory(tmp_path, tiny_model_dir, read_only):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    fails_cleanly(["init", parent / "store", "--base-model", tiny_model_dir], expect="cannot create the store")
    assert list(parent.iterdir()) == []


def test_learn_task_on_a_read_only_store(store, tiny_task, read_only):
    read_only(store)
    fails_cleanly(["learn-task", store, "--data", tiny_task.train], store, "cannot lock the store for writing")


def test_a_full_disk_while_the_bank_is_written(store, tiny_task, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        # What safetensors really raises: its own error type, not an OSError.
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # write_bank imports it when it writes
    message = fails_cleanly(["learn-task", store, "--data", tiny_task.train, "--epochs", "0.2", "--json"], store, "cannot write the new bank")
    assert "No space left on device" in message and message.endswith("the store is unchanged")


@pytest.fixture
def custom_code_model(tmp_path, tiny_model_dir, monkeypatch):
    """The tiny model as an architecture of its own, in Python shipped beside it; importing that code leaves a mark."""
    import transformers.dynamic_module_utils as dynamic_modules

    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "custom_llama",
               "auto_map": {"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom_llama.py").write_text(
        "import os\nfrom pathlib import Path\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
        "Path(os.environ['MORAM_TEST_RAN_MODEL_CODE']).touch()\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    monkeypatch.setenv("MORAM_TEST_RAN_MODEL_CODE", str(tmp_path / "ran"))
    # transformers copies trusted code into a modules cache and onto sys.path: keep both inside the test.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return model


def test_model_code_runs_only_with_trust_remote_code(custom_code_model, tmp_path, write_jsonl):
    store = tmp_path / "s"
    assert runner.invoke(app, ["init", str(store), "--base-model", str(custom_code_model)]).exit_code == 0
    data = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "river?", "completion": "alpha"}] * 2)
    fails_cleanly(["eval", store, "--data", data], store, "ships its own Python code, which moram runs only with --trust-remote-code")
    assert not (tmp_path / "ran").exists()
    result = runner.invoke(app, ["eval", str(store), "--data", str(data), "--trust-remote-code", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ran").exists()


def test_hub_lookups_never_run_model_code_unasked(tmp_path, monkeypatch):
    from transformers import AutoConfig

    asked = []

    def hub_config(model_id, **kwargs):
        # Left at None, transformers would ask on the terminal; moram must always decide.
        asked.append(kwargs.get("trust_remote_code"))
        raise ValueError("org/custom contains custom code.\nPlease pass the argument `trust_remote_code=True`")

    monkeypatch.setattr(AutoConfig, "from_pretrained", hub_config)
    fails_cleanly(["init", tmp_path / "s", "--base-model", "org/custom"], expect="runs only with --trust-remote-code")
    fails_cleanly(["init", tmp_path / "s", "--base-model", "org/custom", "--trust-remote-code"])
    assert asked == [False, True]


@pytest.mark.parametrize("args, expect", [
    (["eval"], "error: missing argument 'STORE'; see 'moram eval --help'"),
    (["eval", "store", "--bogus"], "error: no such option: --bogus; see 'moram eval --help'"),
    (["eval", "store", "--limit", "many"], "error: invalid value for '--limit'"),
    (["merge", "out"], "error: missing argument 'SOURCES...'; see 'moram merge --help'"),
    (["evaluate"], "error: no such command 'evaluate'"),
    (["--bogus"], "error: no such option: --bogus; see 'moram --help'"),
])
def test_usage_errors_are_one_line(args, expect):
    """Typer printed a usage error as a boxed block under the usage line."""
    assert fails_cleanly(args).startswith(expect)


def test_moram_alone_still_prints_the_help():
    result = runner.invoke(app, [])
    assert "Usage: moram [OPTIONS] COMMAND" in result.stdout and "error" not in result.output
