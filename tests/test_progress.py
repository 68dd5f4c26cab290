"""Long phases say what they do in a log too: plain progress lines on stderr when it is not a terminal (issue #21)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from moram_cli.cli import app
from moram_cli.progress import LineProgress

runner = CliRunner()  # its stderr is no terminal, as a CI log is not

LINE = re.compile(r"^(eval|training|task prototype|data keys)[^:]*: \d+/\d+ \(\d+ s\)")


def plain_lines(stderr: str) -> list[str]:
    """The progress lines, once shown to be plain: no escape codes, no carriage returns redrawing a line."""
    assert "\x1b" not in stderr and "\r" not in stderr, repr(stderr)
    lines = stderr.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    return lines


def test_a_phase_prints_a_line_per_tenth_of_its_work(capsys):
    with LineProgress() as progress:
        task = progress.add_task("eval on tasks/test.jsonl (choice)", total=100)
        for _ in range(100):
            progress.advance(task)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"eval on tasks/test.jsonl (choice): {n}/100 (0 s)" for n in range(10, 101, 10)]


def test_eval_in_a_log_prints_progress_lines(tmp_path, tiny_model_dir, tiny_task):
    store = tmp_path / "store"
    assert runner.invoke(app, ["init", str(store), "--base-model", str(tiny_model_dir), "--r", "2"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(store), "--data", str(tiny_task.test)])
    assert result.exit_code == 0, result.output
    assert plain_lines(result.stderr)[-1].startswith("eval on tiny_task0/test.jsonl (choice): 12/12 (")


def test_learn_task_in_a_log_says_which_evaluation_runs(tmp_path, tiny_model_dir, tiny_task):
    store = tmp_path / "store"
    assert runner.invoke(app, ["init", str(store), "--base-model", str(tiny_model_dir), "--r", "2"]).exit_code == 0
    result = runner.invoke(app, ["learn-task", str(store), "--data", str(tiny_task.train), "--eval-data", str(tiny_task.test),
                                 "--epochs", "0.5"])
    assert result.exit_code == 0, result.output
    phases = list(dict.fromkeys(line.split(" on ")[0].split(":")[0] for line in plain_lines(result.stderr)))
    assert phases == ["eval before learning", "task prototype", "training", "eval after learning"], phases
