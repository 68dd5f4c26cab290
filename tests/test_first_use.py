"""Rough edges a new user met (issue 21): broken labels.json, store file modes, output to a log, the first
frame of the training bar, and checks that name the flag at fault."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import Result
from rich.progress import Progress
from typer.testing import CliRunner

from moram_cli.cli import app
from moram_cli.training.progress import LossColumn
from test_errors import fails_cleanly

runner = CliRunner()


def moram(*args) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def store(tmp_path, tiny_model_dir) -> Path:
    moram("init", tmp_path / "store", "--base-model", tiny_model_dir, "--r", "2", "--json")
    return tmp_path / "store"


@pytest.mark.parametrize("labels, expect", [
    ('["alpha", "beta"', "labels.json: cannot be read (Expecting"),
    ('{"alpha": 1}', "labels.json: is not a non-empty JSON list of strings"),
    # gamma is the third label of the cycle, so line 3 is the first answer labels.json lacks.
    ('["alpha", "beta"]', "labels.json: lacks the answer 'gamma' of {data}:3;"),
])
def test_a_broken_labels_json_is_an_error_not_a_fallback_to_generation(store, tiny_task, tmp_path, labels, expect):
    data = tmp_path / "task" / "test.jsonl"
    data.parent.mkdir()
    shutil.copy(tiny_task.test, data)
    (data.parent / "labels.json").write_text(labels)
    message = fails_cleanly(["eval", store, "--data", data], store, expect.format(data=data))
    assert str(data.parent / "labels.json") in message and "make it a JSON list of every answer" in message


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_store_file_follows_the_umask(tmp_path, tiny_model_dir, tiny_task, umask):
    previous = os.umask(umask)
    try:
        moram("init", tmp_path / "s", "--base-model", tiny_model_dir, "--r", "2", "--json")
        moram("learn-task", tmp_path / "s", "--data", tiny_task.train, "--epochs", "0.2", "--json")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "s", *(tmp_path / "s").rglob("*")]}
    assert any(name.endswith("weights.safetensors") for name in modes)
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected


@pytest.fixture
def long_store(tmp_path_factory, tiny_model_dir, tiny_task) -> Path:
    """A trained store whose path alone is wider than an 80-column table."""
    path = tmp_path_factory.mktemp("wide") / ("a-store-with-a-rather-long-name-" * 4) / "store"
    path.parent.mkdir()
    moram("init", path, "--base-model", tiny_model_dir, "--r", "2", "--json")
    moram("learn-task", path, "--data", tiny_task.train, "--epochs", "0.2", "--json")
    return path


def test_tables_printed_to_a_pipe_are_not_cut_to_80_columns(long_store, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    for command in ("verify", "inspect-ranks"):
        lines = moram(command, long_store).stdout.splitlines()
        assert any(str(long_store) in line for line in lines), f"{command}:\n" + "\n".join(lines)
        assert not any("…" in line for line in lines)
    bank = next((long_store / "banks").iterdir())
    assert any(str(bank.name) in line and "OK" in line for line in moram("verify", long_store).stdout.splitlines())


def test_the_training_bar_shows_no_loss_before_the_first_step():
    progress = Progress(LossColumn())
    before, after = progress.add_task("training", loss=None), progress.add_task("training", loss=1.23456)
    column = LossColumn()
    assert column.render(progress.tasks[before]).plain == "loss –"
    assert column.render(progress.tasks[after]).plain == "loss 1.2346"


@pytest.mark.parametrize("flag, value, need", [
    ("--r", "0", "need >= 1"), ("--k", "0", "need >= 1"), ("--temperature", "0", "need > 0"),
    ("--dropout", "1", "need 0 <= dropout < 1"), ("--threshold", "-1", "need >= 0"),
])
def test_init_names_the_adapter_flag_that_is_out_of_range(tmp_path, tiny_model_dir, flag, value, need):
    fails_cleanly(["init", tmp_path / "s", "--base-model", tiny_model_dir, flag, value], expect=f"invalid {flag} {value}")
    assert not (tmp_path / "s").exists()


def test_k_help_and_check_agree_that_1_is_the_least(tmp_path, tiny_model_dir):
    assert "at least 1" in " ".join(runner.invoke(app, ["init", "--help"]).output.split())
    moram("init", tmp_path / "s", "--base-model", tiny_model_dir, "--k", "1", "--json")


def test_data_smaller_than_one_batch_warns_and_still_trains(store, tmp_path, write_jsonl, tiny_task):
    rows = [json.loads(line) for line in tiny_task.train.read_text().splitlines()[:3]]
    result = moram("learn-task", store, "--data", write_jsonl(tmp_path / "few.jsonl", rows), "--batch-size", "8", "--json")
    assert result.stderr.strip() == ("warning: 3 example(s) are fewer than one batch (--batch-size 8), so each epoch is a single step; "
                                     "lower --batch-size for more steps")
    assert json.loads(result.stdout)["steps"] == 1


def test_max_length_beyond_the_model_context_is_refused(store, tiny_task):
    # The tiny Llama has 512 positions.
    expect = "--max-length 600 is beyond the model's context of 512 tokens; give --max-length 512 or less"
    fails_cleanly(["learn-task", store, "--data", tiny_task.train, "--max-length", "600"], store, expect)
    fails_cleanly(["eval", store, "--data", tiny_task.test, "--max-length", "600"], store, expect)


def test_invalid_yaml_says_where_and_what(tmp_path, tiny_model_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("adapter:\n  r: 4\n k: 2\n")
    message = fails_cleanly(["init", tmp_path / "s", "--base-model", tiny_model_dir, "--recipe", recipe], expect=f"{recipe}: recipe is corrupt")
    assert "(line 3, column 2: expected <block end>, but found '<block mapping start>', while parsing a block mapping from line 1)" in message


def test_the_gguf_conversion_draws_no_raw_bar(capsys):
    """transformers' GGUF reader drew its own tqdm bar into the output of the first command to load the embedded model."""
    from transformers import modeling_gguf_pytorch_utils as reader

    from moram_cli.models.loading import gguf_reader_without_bar

    bar = reader.tqdm
    with gguf_reader_without_bar():
        assert list(reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert capsys.readouterr().err == "" and reader.tqdm is bar
