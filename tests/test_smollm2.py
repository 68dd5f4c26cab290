"""End to end on the real embedded model (SmolLM2-135M-Instruct): slow, a couple of minutes on 2 cores."""

from __future__ import annotations

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
