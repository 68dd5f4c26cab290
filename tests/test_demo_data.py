"""The data sample shipped for `moram demo` is complete and readable."""

import json

import pytest

from moram_cli.data.jsonl import read_examples
from moram_cli.demo import DEMO_DATA, DEMO_TASKS


@pytest.mark.parametrize("task", DEMO_TASKS)
def test_demo_task_files_load_and_match_their_labels(task):
    labels = json.loads((DEMO_DATA / task / "labels.json").read_text())
    train = read_examples(DEMO_DATA / task / "train.jsonl")
    test = read_examples(DEMO_DATA / task / "test.jsonl")
    assert (len(train), len(test)) == (300, 100)
    assert {ex.completion for ex in train + test} == set(labels)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
