"""Standard suites through lm-evaluation-harness: the shipped local suite, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from moram_cli.errors import MoramError
from moram_cli.evaluation.harness import _data_errors
from test_cli import moram, ok_json
from test_errors import fails_cleanly

TINY_TOPIC = Path(__file__).parent.parent / "moram_cli" / "suites" / "tiny_topic"

pytest.importorskip("lm_eval")


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    path = tmp_path / "store"
    ok_json("init", path, "--base-model", tiny_model_dir, "--r", "4")
    return path


def test_a_local_suite_runs_on_the_stores_model(store):
    result = ok_json("eval", store, "--suite-path", TINY_TOPIC, "--limit", "4", "--batch-size", "4")
    scores = result["results"]["tiny_topic"]
    assert set(scores) == {"acc", "acc_norm", "n"} and scores["n"] == 4 and 0 <= scores["acc"] <= 1
    assert result["banks"] == [] and result["lm_eval_version"]
    markdown = moram("eval", store, "--suite-path", TINY_TOPIC, "--suite", "tiny_topic", "--limit", "2", "--markdown").output
    assert "| task | acc | acc_norm | n |" in markdown and "| tiny_topic |" in markdown


def test_suite_errors_are_one_line(store, tmp_path):
    fails_cleanly(["eval", store, "--suite-path", TINY_TOPIC, "--suite", "mmlu"], store, expect="no lm-eval task 'mmlu' in this folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "t.yaml").write_text((TINY_TOPIC / "tiny_topic.yaml").read_text().replace("tiny_topic", "broken_task"))
    fails_cleanly(["eval", store, "--suite-path", broken, "--limit", "1"], store, expect="cannot load the suite's data")


def test_an_unreachable_hub_points_at_local_suites():
    with pytest.raises(MoramError, match="offline, point --suite-path at a folder"):
        with _data_errors("mmlu", None):
            raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (OfflineModeIsEnabled)")
