"""The accuracy matrix: recorded by learn-task --eval-data, reported by eval --suite cl, and gated for CI."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import random_bank, tiny_task_rows
from moram_cli.cli import app
from moram_cli.evaluation.ci_gates import check_gates
from moram_cli.errors import GateViolation
from moram_cli.store import MemoryStore
from test_cli import moram, ok_json
from test_errors import fails_cleanly

runner = CliRunner()

# R[i][j] after learning task i; the accuracy on each task just before it was learned; the base model's.
ROWS = [[0.8], [0.6, 0.9], [0.5, 0.7, 0.95]]
BEFORE, ZERO_SHOT = [0.1, 0.2, 0.4], [0.1, 0.15, 0.3]


@pytest.fixture
def recorded(tmp_path, tiny_model_dir):
    """A store whose three banks carry hand-written accuracy records (no training)."""
    path = tmp_path / "recorded"
    ok_json("init", path, "--base-model", tiny_model_dir, "--r", "4")
    store, tasks = MemoryStore.open(path), ["one", "two", "three"]
    for i, task in enumerate(tasks):
        test = {"data": f"/data/{task}/test.jsonl", "data_sha256": "0" * 64, "scoring": "choice", "examples": 20}
        record = {"test": test, "before": BEFORE[i], "zero_shot": ZERO_SHOT[i], "row": dict(zip(tasks, ROWS[i]))}
        store.add_bank(task, random_bank(4, i), {"cl": record, "tool_version": "0.1.0"})
    return path


def test_suite_cl_reports_the_matrix_and_metrics_from_the_records(recorded):
    report = ok_json("eval", recorded, "--suite", "cl")
    assert report["matrix"] == ROWS and report["before"] == BEFORE and report["zero_shot"] == ZERO_SHOT
    assert report["average_accuracy"]["value"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert report["bwt"]["value"] == pytest.approx(-0.25) and report["bwt"]["denominator"] == 2
    assert report["fwt"]["value"] == pytest.approx(0.075) and report["forgetting"] == pytest.approx([0.3, 0.2, None])
    assert [t["scoring"] for t in report["tasks"]] == ["choice"] * 3 and report["base_model"]["kind"] == "local"
    assert ok_json("eval", recorded, "--suite", "cl", "--upto", "2")["matrix"] == ROWS[:2]


def test_suite_cl_prints_a_table_or_markdown_stating_the_denominators(recorded):
    text = moram("eval", recorded, "--suite", "cl").output
    assert "after three" in text and "BWT -0.250" in text and "over 2 term(s)" in text
    markdown = moram("eval", recorded, "--suite", "cl", "--markdown").output
    assert "| stage | one | two | three |" in markdown and "| after one | 0.800 |  |  |" in markdown
    assert "- BWT -0.250 = 1/(T-1)" in markdown


@pytest.mark.parametrize("flags,reason", [
    (["--min-accuracy", "0.8"], "average accuracy 0.717 is below --min-accuracy 0.8"),
    (["--max-forgetting", "0.25"], "forgetting 0.300 on task one is above --max-forgetting 0.25"),
])
def test_a_missed_gate_exits_1_with_one_line_after_the_result(recorded, flags, reason):
    result = runner.invoke(app, ["eval", str(recorded), "--suite", "cl", "--json", *flags])
    assert result.exit_code == 1 and json.loads(result.stdout)["matrix"] == ROWS
    assert result.stderr.strip() == f"gate failed: {reason}"


def test_met_gates_exit_0(recorded):
    assert moram("eval", recorded, "--suite", "cl", "--min-accuracy", "0.7", "--max-forgetting", "0.3").exit_code == 0


def test_gates_on_one_test_set_and_on_lm_eval_scores(store_with_task, tiny_task):
    accuracy = ok_json("eval", store_with_task, "--data", tiny_task.test)["accuracy"]
    assert moram("eval", store_with_task, "--data", tiny_task.test, "--min-accuracy", str(accuracy)).exit_code == 0
    if accuracy < 0.99:
        assert moram("eval", store_with_task, "--data", tiny_task.test, "--min-accuracy", str(accuracy + 0.01)).exit_code == 1
    assert "| data | banks | scoring | accuracy | correct |" in moram("eval", store_with_task, "--data", tiny_task.test, "--markdown").output
    with pytest.raises(GateViolation, match="tiny_topic acc 0.250 is below"):
        check_gates({"results": {"tiny_topic": {"acc": 0.25, "n": 4}}}, min_accuracy=0.5)


@pytest.mark.parametrize("args,expect", [
    ([], "give one of --data"),
    (["--suite", "cl", "--data", "x.jsonl"], "give one of --data"),
    (["--suite", "cl", "--min-accuracy", "1.5"], "--min-accuracy 1.5 is out of range"),
    (["--data", "x.jsonl", "--max-forgetting", "0.1"], "--max-forgetting goes with --suite cl"),
    (["--suite", "cl", "--base-only"], "--base-only does not apply"),
])
def test_eval_usage_errors_exit_2(recorded, args, expect):
    fails_cleanly(["eval", recorded, *args], recorded, expect=expect)


def test_a_store_without_records_has_no_matrix(store_with_task):
    fails_cleanly(["eval", store_with_task, "--suite", "cl"], store_with_task, expect="learn tasks with --eval-data")


@pytest.fixture
def store_with_task(tmp_path, tiny_model_dir, tiny_task):
    path = tmp_path / "plain"
    ok_json("init", path, "--base-model", tiny_model_dir, "--r", "4", "--k", "2", "--temperature", "0.1")
    ok_json("learn-task", path, "--data", tiny_task.train, "--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    return path


def test_learn_task_records_each_row_and_the_accuracies_before_learning(tmp_path, tiny_model_dir, tiny_task, write_jsonl):
    store, other = tmp_path / "s", write_jsonl(tmp_path / "other" / "test.jsonl", tiny_task_rows(9, seed=7))
    ok_json("init", store, "--base-model", tiny_model_dir, "--r", "4", "--k", "2", "--temperature", "0.1")
    flags = ("--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    first = ok_json("learn-task", store, "--data", tiny_task.train, "--eval-data", tiny_task.test, "--name", "one", *flags)
    second = ok_json("learn-task", store, "--data", tiny_task.train, "--eval-data", other, "--name", "two", *flags)
    report = ok_json("eval", store, "--suite", "cl")
    accuracy = lambda data, *upto: ok_json("eval", store, "--data", data, *upto)["accuracy"]  # noqa: E731
    assert report["matrix"] == [[first["eval"]["accuracy"]], [accuracy(tiny_task.test), second["eval"]["accuracy"]]]
    assert report["zero_shot"] == [accuracy(tiny_task.test, "--base-only"), accuracy(other, "--base-only")]
    assert report["before"] == [report["zero_shot"][0], accuracy(other, "--upto", "1")]
    assert report["tasks"][1]["data"] == str(other.resolve()) and report["tasks"][1]["examples"] == 9


def test_a_changed_test_set_leaves_a_null_cell_and_a_warning(tmp_path, tiny_model_dir, tiny_task):
    store, test = tmp_path / "s", tmp_path / "one" / "test.jsonl"
    test.parent.mkdir()
    shutil.copy(tiny_task.test, test)
    ok_json("init", store, "--base-model", tiny_model_dir, "--r", "4")
    ok_json("learn-task", store, "--data", tiny_task.train, "--eval-data", test, "--name", "one", "--epochs", "0.5")
    test.write_text(test.read_text().replace("alpha", "beta"))
    result = runner.invoke(app, ["learn-task", str(store), "--data", str(tiny_task.train), "--eval-data", str(tiny_task.test),
                                 "--name", "two", "--epochs", "0.5", "--json"])
    assert result.exit_code == 0 and "warning: " in result.stderr and "has changed since the task was learned" in result.stderr
    assert ok_json("eval", store, "--suite", "cl")["matrix"][1][0] is None
