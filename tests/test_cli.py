"""The commands end to end through Typer's runner, on a tiny random Llama built in the test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import moram_cli
from conftest import snapshot
from moram_cli.cli import app

runner = CliRunner()
INIT_RECIPES = Path(moram_cli.__file__).parent / "recipes" / "init"


def moram(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args: str) -> dict:
    result = moram(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    path = tmp_path / "store"
    ok_json("init", path, "--base-model", tiny_model_dir, "--r", "4", "--k", "2", "--temperature", "0.1")
    return path


@pytest.fixture
def trained(store, tiny_task):
    ok_json("learn-task", store, "--data", tiny_task.train, "--name", "tiny", "--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    return store


def test_init_records_base_model_and_settings(store, tiny_model_dir):
    import yaml

    config = yaml.safe_load((store / "store.yaml").read_text())
    assert config["base_model"]["kind"] == "local" and config["base_model"]["source"] == str(tiny_model_dir)
    assert len(config["base_model"]["fingerprint"]) == 64
    assert config["adapter"] == {"r": 4, "k": 2, "temperature": 0.1, "threshold": 0.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj"],
                                 "lora_alpha": None, "routing": "task", "key_init": "data", "gate_scope": "bank"}
    assert config["format_version"] == 1 and config["method"] == "moram" and config["dtype"] == "float32"
    assert list((store / "banks").iterdir()) == []


def test_init_takes_a_recipe_and_flags_override_it(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: {r: 3, k: 5, target_modules: all-linear}\ntraining: {lr: 0.5, epochs: 3}\n")
    config = ok_json("init", tmp_path / "s", "--base-model", tiny_model_dir, "--recipe", recipe, "--k", "6")
    assert (config["adapter"]["r"], config["adapter"]["k"], config["adapter"]["target_modules"]) == (3, 6, "all-linear")
    assert (config["training"]["lr"], config["training"]["epochs"]) == (0.5, 3)


@pytest.mark.parametrize("recipe", sorted(INIT_RECIPES.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_init_recipe_sets_all_it_names(tmp_path, tiny_model_dir, recipe):
    config = ok_json("init", tmp_path / "s", "--base-model", tiny_model_dir, "--recipe", recipe)
    for section, settings in yaml.safe_load(recipe.read_text()).items():
        assert {key: config[section][key] for key in settings} == settings


def test_learn_task_writes_a_bank_of_keys_and_values(trained):
    bank = trained / "banks" / "001-tiny"
    tensors = load_file(bank / "weights.safetensors")
    # A task-routed store (the default) records the task's prototype beside each module's keys and values.
    assert sorted(tensors) == sorted(f"model.layers.{i}.self_attn.{m}.{t}" for i in range(2) for m in ("q_proj", "k_proj") for t in ("A", "B", "prototype"))
    assert tensors["model.layers.0.self_attn.q_proj.prototype"].shape == (32,)
    assert tensors["model.layers.0.self_attn.q_proj.A"].shape == (4, 32)
    assert tensors["model.layers.0.self_attn.k_proj.B"].shape == (16, 4)
    assert all(tensors[k].abs().sum() > 0 for k in tensors if k.endswith(".B"))
    import yaml

    meta = yaml.safe_load((bank / "bank.yaml").read_text())
    assert meta["task"] == "tiny" and meta["examples"] == 24 and meta["steps"] == 12
    assert meta["hyperparameters"]["lr"] == 0.01 and len(meta["data_sha256"]) == 64 and len(meta["weights_sha256"]) == 64
    assert meta["loss"]["last"] < meta["loss"]["first"]
    assert not any((trained / ".staging").iterdir())


def test_second_task_adds_a_bank_and_leaves_the_first_untouched(trained, tiny_task):
    first = snapshot(trained / "banks" / "001-tiny")
    ok_json("learn-task", trained, "--data", tiny_task.train, "--name", "again", "--epochs", "0.5")
    assert snapshot(trained / "banks" / "001-tiny") == first
    assert sorted(p.name for p in (trained / "banks").iterdir()) == ["001-tiny", "002-again"]


def test_later_tasks_train_at_later_lr_unless_lr_is_given(store, tiny_task):
    lrs = []
    for name, flags in (("one", []), ("two", []), ("three", ["--lr", "0.03"])):
        summary = ok_json("learn-task", store, "--data", tiny_task.train, "--name", name, "--epochs", "0.2", *flags)
        lrs.append(summary["hyperparameters"]["lr"])
    assert lrs == [2e-3, 5e-4, 0.03]


def test_each_task_draws_its_own_initial_keys(store, tiny_task):
    # lr ~0 keeps every key at its initial draw; same seed, so only the task index can tell them apart
    for name in ("one", "two"):
        ok_json("learn-task", store, "--data", tiny_task.train, "--name", name, "--lr", "1e-12", "--epochs", "0.2", "--seed", "0")
    one, two = (load_file(store / "banks" / b / "weights.safetensors") for b in ("001-one", "002-two"))
    key = "model.layers.0.self_attn.q_proj.A"
    assert one[key].abs().sum() > 0 and (one[key] - two[key]).abs().max() > 1e-3


def test_eval_scores_by_choice_and_upto_zero_is_the_base_model(trained, tiny_task):
    full = ok_json("eval", trained, "--data", tiny_task.test)
    assert full["scoring"] == "choice" and full["labels"] == ["alpha", "beta", "gamma"] and full["total"] == 12
    assert full["banks"] == ["001-tiny"]
    base = ok_json("eval", trained, "--data", tiny_task.test, "--base-only")
    assert base["banks"] == [] and base == ok_json("eval", trained, "--data", tiny_task.test, "--upto", "0")


def test_eval_by_generation(trained, tiny_task):
    result = ok_json("eval", trained, "--data", tiny_task.test, "--scoring", "generate")
    assert result["scoring"] == "generate" and 0 <= result["accuracy"] <= 1 and "labels" not in result


def test_long_prompts_are_cut_and_counted(store, tiny_task):
    result = ok_json("learn-task", store, "--data", tiny_task.train, "--max-length", "24", "--epochs", "0.2")
    assert result["truncated_examples"] == 24


def test_default_task_name_comes_from_the_file(store, tiny_task, tmp_path, write_jsonl):
    yelp = write_jsonl(tmp_path / "yelp.jsonl", [json.loads(line) for line in tiny_task.train.read_text().splitlines()])
    assert ok_json("learn-task", store, "--data", yelp, "--epochs", "0.2")["task"] == "yelp"
    assert ok_json("learn-task", store, "--data", tiny_task.train, "--epochs", "0.2")["task"] == "tiny_task0"


def test_help_texts_describe_every_command():
    assert "init" in moram("--help").output and "learn-task" in moram("--help").output
    for command, words in {"init": ["--base-model", "--recipe", "--method", "inclora", "--target-modules", "--trust-remote-code"],
                           "learn-task": ["--data", "--eval-data", "--max-length", "--json", "--break-lock", "--trust-remote-code",
                                          "global batch", "--grad-accum", "--precision", "--gradient-checkpointing", "--max-steps",
                                          "--checkpoint-every", "--resume", "--launch", "cpu-ddp", "zero3", "--num-processes",
                                          "--collective-timeout"],
                           "eval": ["--scoring", "--upto", "--base-only", "--suite", "--suite-path", "--limit", "--min-accuracy",
                                    "--max-forgetting", "--markdown", "exits with code 1", "--trust-remote-code"],
                           "verify": ["sha256", "safetensors", "001..N", "--json"],
                           "inspect-ranks": ["--data", "--module", "--top", "[default: 5]", "--plot", "moram[plot]", "--json"],
                           "merge": ["new store to write", "stores to merge", "--tasks", "--prune-below", "--data", "--eval-data", "--json"]}.items():
        text = moram(command, "--help").output
        assert all(w in text for w in words), command


@pytest.mark.parametrize("command", [None, "init", "learn-task", "eval", "verify", "inspect-ranks", "merge", "generate", "demo"])
def test_help_shows_flags_bare_and_arguments_in_capitals(command):
    """Typer's help showed `--json <bool>` and `Usage: moram eval [OPTIONS] {store}`."""
    text = moram(*filter(None, [command]), "--help").output
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "<bool>" not in text and "{" not in usage, text
    assert command not in ("eval", "merge") or {"eval": "STORE", "merge": "OUT SOURCES..."}[command] in usage


def test_a_loaded_store_runs_in_inference_mode_so_the_threshold_applies(trained):
    from moram_cli.models.memory import build_memory_model
    from moram_cli.store import MemoryStore

    model, _ = build_memory_model(MemoryStore.open(trained))
    layers = model.moram_layers().values()
    assert layers and not any(layer.training for layer in layers)
    assert all(layer.frozen_ranks == 4 for layer in layers)


def test_chat_and_plain_text_data_train_too(store, tmp_path, write_jsonl):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"river {i}?"},
                                                               {"role": "assistant", "content": "alpha"}]} for i in range(6)])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the market today {i}"} for i in range(6)])
    assert ok_json("learn-task", store, "--data", chat, "--batch-size", "3")["steps"] == 2
    assert ok_json("learn-task", store, "--data", text, "--batch-size", "3")["steps"] == 2
    assert ok_json("eval", store, "--data", chat, "--scoring", "choice")["labels"] == ["alpha"]
