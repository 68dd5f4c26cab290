"""End to end on the real embedded model (SmolLM2-135M-Instruct): slow, a couple of minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moram_cli.demo import DEMO_DATA
from moram_cli.evaluation.evaluate import evaluate_store
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A few dozen DBpedia examples from the shipped demo data, with its labels.json for ranked choice."""
    root = tmp_path_factory.mktemp("sample") / "dbpedia"  # mktemp adds a numeric suffix; the task is named after this folder
    root.mkdir()
    source = DEMO_DATA / "dbpedia"
    (root / "train.jsonl").write_text("".join(source.joinpath("train.jsonl").read_text().splitlines(True)[:48]))
    (root / "test.jsonl").write_text("".join(source.joinpath("test.jsonl").read_text().splitlines(True)[:24]))
    (root / "labels.json").write_text(source.joinpath("labels.json").read_text())
    return root


def test_init_learn_eval_on_smollm2(tmp_path, sample):
    store = tmp_path / "store"
    config = init_store(store)
    assert config["base_model"]["kind"] == "embedded" and config["base_model"]["source"] == "SmolLM2-135M-Instruct"
    zero_shot = evaluate_store(store, sample / "test.jsonl", show_progress=False)
    summary = learn_task(store, sample / "train.jsonl", eval_data=sample / "test.jsonl", show_progress=False)
    assert summary["task"] == "dbpedia" and summary["steps"] == 6 and summary["trainable_parameters"] == 460_800
    assert summary["loss"]["last"] < summary["loss"]["first"]
    after = evaluate_store(store, sample / "test.jsonl", show_progress=False)
    assert after["scoring"] == zero_shot["scoring"] == "choice" and len(after["labels"]) == 14
    assert after["accuracy"] == summary["eval"]["accuracy"]  # same model, same data, whether in-process or reloaded
    assert after["accuracy"] > zero_shot["accuracy"]
    assert [b.name for b in MemoryStore.open(store).banks()] == ["dbpedia"]


def test_the_command_that_converts_the_model_keeps_its_json_output_clean(tmp_path, sample):
    """The first command to load the embedded model converts it; transformers then imported DeepSpeed, whose log went to
    stdout ahead of the JSON."""
    store = tmp_path / "store"
    init_store(store)
    two = tmp_path / "dbpedia" / "test.jsonl"
    two.parent.mkdir()
    two.write_text("".join((sample / "test.jsonl").read_text().splitlines(True)[:2]))
    # Without the DS_ACCELERATOR this process may have set: a user's shell has none, and DeepSpeed then logs its guess.
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"MORAM_CACHE": str(tmp_path / "fresh-cache")}
    done = subprocess.run([sys.executable, "-m", "moram_cli", "eval", str(store), "--data", str(two), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "converting SmolLM2-135M-Instruct" in done.stderr
    assert json.loads(done.stdout)["total"] == 2
