"""Resume data: written on Ctrl-C, SIGTERM and every N steps; `--resume` finishes to the bank an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket

import pytest
import yaml
from typer.testing import CliRunner

from conftest import snapshot
from moram_cli.cli import app
from moram_cli.store.bank import META_FILE, WEIGHTS_FILE
from moram_cli.store.lock import LOCK_FILE
from moram_cli.training.interrupts import StopRequest

runner = CliRunner()
NO_SUCH_PID = 4_194_305  # above Linux's largest pid_max, so never a running process
# Dropout and a cosine schedule: resuming must restore the RNG and the scheduler, not only weights and moments.
SETTINGS = ["--epochs", "3", "--batch-size", "4", "--lr", "1e-2", "--lr-schedule", "cosine", "--checkpoint-every", "4"]


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    path = tmp_path / "store"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "4", "--k", "2", "--dropout", "0.1"]).exit_code == 0
    return path


def learn(store, data, *extra):
    return runner.invoke(app, ["learn-task", str(store), "--data", str(data), "--name", "t", "--json", *map(str, extra)])


def finished(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def interrupt_at(monkeypatch):
    """`interrupt_at(n, sig)`: deliver `sig` to this process during the n-th forward pass, as Ctrl-C or a scheduler would."""
    import moram_cli.training.loop as loop

    def arm(n: int, sig: int = signal.SIGINT) -> None:
        calls, real = [0], loop.completion_loss

        def loss(model, batch):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), sig)
            return real(model, batch)

        monkeypatch.setattr(loop, "completion_loss", loss)

    yield arm
    monkeypatch.undo()


def resume_steps(store) -> list[str]:
    return sorted(p.name for p in (store / ".staging" / "resume-t").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_resumes_to_the_bank_of_an_uninterrupted_one(store, tmp_path, tiny_task, interrupt_at, sig):
    reference = tmp_path / "reference"
    shutil.copytree(store, reference)
    whole = finished(learn(reference, tiny_task.train, *SETTINGS))

    interrupt_at(7, sig)
    stopped = learn(store, tiny_task.train, *SETTINGS)
    assert stopped.exit_code == 130 and stopped.stderr.strip() == (
        "interrupted; the store is unchanged; progress saved at step 7/18; continue with --resume")
    assert resume_steps(store) == ["step-00000007"] and not list((store / "banks").iterdir())
    assert not (store / LOCK_FILE).exists()

    resumed = finished(learn(store, tiny_task.train, "--resume"))
    assert resumed["resumed_from_step"] == 7 and resumed["steps"] == whole["steps"] == 18
    assert resumed["loss"] == whole["loss"] and resumed["tokens"] == whole["tokens"]
    bank, expected = (yaml.safe_load((s / "banks" / "001-t" / META_FILE).read_text()) for s in (store, reference))
    # Bitwise: the same file bytes.
    assert bank["weights_sha256"] == expected["weights_sha256"]
    assert not (store / ".staging" / "resume-t").exists()


def test_only_the_newest_checkpoint_is_kept(store, tiny_task, interrupt_at):
    interrupt_at(10)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    assert resume_steps(store) == ["step-00000010"]
    step = store / ".staging" / "resume-t" / "step-00000010"
    assert sorted(p.name for p in step.iterdir()) == ["state.yaml", "tensors.safetensors"]
    state = yaml.safe_load((step / "state.yaml").read_text())
    assert state["step"] == 10 and len(state["losses"]) == 10 and state["run"]["processes"] == 1
    assert state["settings"]["checkpoint_every"] == 4 and state["run"]["lr_schedule"] == "cosine"


def test_resume_without_a_checkpoint_is_refused(store, tiny_task):
    before = snapshot(store)
    result = learn(store, tiny_task.train, "--resume")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {store}: no interrupted run of task 't' to resume (no checkpoint in {store}/.staging/resume-t); "
        "run learn-task without --resume")
    assert snapshot(store) == before


def test_resume_refuses_other_data_or_settings(store, tiny_task, tmp_path, interrupt_at):
    interrupt_at(3)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    interrupt_at(10**6)
    other = tmp_path / "other.jsonl"
    other.write_text(tiny_task.train.read_text().replace("alpha", "omega"))
    for args, says in (([other, "--resume"], "the interrupted run had data_sha256="), ([tiny_task.train, "--resume", "--lr", "0.5"], "had lr=0.01, this command 0.5")):
        before = snapshot(store)
        result = learn(store, *args)
        assert result.exit_code == 2 and says in result.stderr and result.stderr.strip().endswith(
            "resume with the same data and settings, or delete that directory to start over"), result.output
        assert snapshot(store) == before
    # The interval between checkpoints does not shape the result, so it may change.
    assert finished(learn(store, tiny_task.train, "--resume", "--checkpoint-every", "1"))["resumed_from_step"] == 3


def test_a_fresh_run_does_not_overwrite_resume_data(store, tiny_task, interrupt_at):
    interrupt_at(3)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    result = learn(store, tiny_task.train, *SETTINGS)
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {store}/.staging/resume-t: holds an interrupted run of task 't'; continue it with --resume, "
        "or delete that directory to start over")


def test_resume_clears_the_lock_of_its_killed_run_but_never_a_running_ones(store, tiny_task, interrupt_at):
    interrupt_at(3)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    interrupt_at(10**6)
    holder = {"host": socket.gethostname(), "since": "2025-01-02T03:04:05+00:00", "command": "moram learn-task"}
    (store / LOCK_FILE).write_text(yaml.safe_dump({"pid": os.getpid(), **holder}))
    assert "wait for it to finish" in learn(store, tiny_task.train, "--resume").stderr
    (store / LOCK_FILE).write_text(yaml.safe_dump({"pid": NO_SUCH_PID, **holder}))
    assert finished(learn(store, tiny_task.train, "--resume"))["resumed_from_step"] == 3
    assert not (store / LOCK_FILE).exists()


def test_resume_data_left_behind_a_written_bank_is_cleared(store, tiny_task, tmp_path, interrupt_at):
    # A run killed between renaming its bank into place and removing its resume data.
    interrupt_at(3)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    interrupt_at(10**6)
    shutil.copytree(store / ".staging" / "resume-t", tmp_path / "kept")
    bank = finished(learn(store, tiny_task.train, "--resume"))
    shutil.copytree(tmp_path / "kept", store / ".staging" / "resume-t")
    weights = (store / "banks" / "001-t" / WEIGHTS_FILE).read_bytes()
    again = finished(learn(store, tiny_task.train, "--resume"))
    assert again["bank"] == bank["bank"] and again["weights_sha256"] == yaml.safe_load((store / "banks" / "001-t" / META_FILE).read_text())["weights_sha256"]
    assert (store / "banks" / "001-t" / WEIGHTS_FILE).read_bytes() == weights and not (store / ".staging" / "resume-t").exists()


def test_a_second_ctrl_c_stops_at_once():
    request = StopRequest()
    request.handle(signal.SIGINT, None)
    assert request.requested
    with pytest.raises(KeyboardInterrupt):
        request.handle(signal.SIGINT, None)


def test_verify_names_resume_data_as_such(store, tiny_task, interrupt_at):
    interrupt_at(3)
    assert learn(store, tiny_task.train, *SETTINGS).exit_code == 130
    report = json.loads(runner.invoke(app, ["verify", str(store), "--json"]).stdout)
    assert report["ok"] and report["warnings"] == [
        f"{store}/.staging/resume-t: resume data of an interrupted learn-task of task 't'; continue it with learn-task --resume, or delete it"]
