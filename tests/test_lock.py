"""One writer per store: the lock file, what a second writer is told, stale locks and --break-lock."""

from __future__ import annotations

import os
import socket

import pytest
import yaml
from typer.testing import CliRunner

from conftest import snapshot
from moram_cli.cli import app
from moram_cli.errors import MoramError
from moram_cli.store.lock import LOCK_FILE, lock_message, store_lock

runner = CliRunner()
NO_SUCH_PID = 4_194_305  # above Linux's largest pid_max, so never a running process


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    path = tmp_path / "store"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "2"]).exit_code == 0
    return path


def learn(store, data, *extra):
    return runner.invoke(app, ["learn-task", str(store), "--data", str(data), "--epochs", "0.2", "--json", *map(str, extra)])


def plant_lock(store, pid: int, host: str | None = None) -> None:
    holder = {"pid": pid, "host": host or socket.gethostname(), "since": "2025-01-02T03:04:05+00:00", "command": "moram learn-task"}
    (store / LOCK_FILE).write_text(yaml.safe_dump(holder))


def refused(result) -> str:
    message = result.stderr.strip()
    assert result.exit_code == 2 and message.startswith("error: ") and "\n" not in message, result.output
    return message


def test_a_second_writer_is_told_who_holds_the_store(store, tiny_task):
    with store_lock(store, "moram learn-task"):
        before = snapshot(store)
        message = refused(learn(store, tiny_task.train))
        assert snapshot(store) == before
    assert message == (f"error: {store}: store is locked by pid {os.getpid()} on {socket.gethostname()} since "
                       f"{yaml.safe_load(before[LOCK_FILE])['since']} (moram learn-task); wait for it to finish")
    assert not (store / LOCK_FILE).exists()


def test_the_lock_is_held_during_training_and_released_after(store, tiny_task, monkeypatch):
    import moram_cli.training.loop as learn_module

    seen = []
    real_loss = learn_module.completion_loss

    def loss_watching_the_lock(model, batch):
        seen.append(lock_message(store))
        return real_loss(model, batch)

    monkeypatch.setattr(learn_module, "completion_loss", loss_watching_the_lock)
    assert learn(store, tiny_task.train).exit_code == 0
    assert seen and "store is locked by pid" in seen[0] and "(moram learn-task)" in seen[0]
    assert not (store / LOCK_FILE).exists()


def test_the_lock_goes_after_an_error_and_after_ctrl_c(store, tiny_task, tmp_path, monkeypatch):
    import moram_cli.training.loop as learn_module

    refused(learn(store, tmp_path / "missing.jsonl"))
    assert not (store / LOCK_FILE).exists()

    def interrupted(model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(learn_module, "completion_loss", interrupted)
    assert learn(store, tiny_task.train).exit_code == 130
    assert not (store / LOCK_FILE).exists()


def test_a_stale_lock_is_reported_and_break_lock_clears_it(store, tiny_task):
    plant_lock(store, NO_SUCH_PID)
    message = refused(learn(store, tiny_task.train))
    assert f"lock by pid {NO_SUCH_PID} on {socket.gethostname()} since 2025-01-02T03:04:05+00:00 (moram learn-task) is stale" in message
    assert message.endswith("(the process is gone); rerun with --break-lock to clear it")
    result = learn(store, tiny_task.train, "--break-lock")
    assert result.exit_code == 0 and f"--break-lock: removed the lock of pid {NO_SUCH_PID} on {socket.gethostname()}" in result.stderr
    assert [p.name for p in (store / "banks").iterdir()] == ["001-tiny_task0"] and not (store / LOCK_FILE).exists()


def test_break_lock_never_breaks_a_running_process(store, tiny_task):
    plant_lock(store, os.getpid())
    before = snapshot(store)
    message = refused(learn(store, tiny_task.train, "--break-lock"))
    assert "wait for it to finish" in message and "never breaks the lock of a running process" in message
    assert snapshot(store) == before


def test_another_hosts_lock_cannot_be_probed_so_it_offers_break_lock(store, tiny_task):
    plant_lock(store, 1234, host="elsewhere.example")
    message = refused(learn(store, tiny_task.train))
    assert "locked by pid 1234 on elsewhere.example" in message and message.endswith("or rerun with --break-lock if that process is gone")
    assert learn(store, tiny_task.train, "--break-lock").exit_code == 0


@pytest.mark.parametrize("content", ["", "pid: [1\n", "pid: 0\nhost: h\nsince: t\ncommand: c\n", "just text"])
def test_an_unreadable_lock_is_reported_and_can_be_broken(store, content):
    (store / LOCK_FILE).write_text(content)
    with pytest.raises(MoramError, match="is unreadable.*rerun with --break-lock"):
        with store_lock(store, "moram merge"):
            pass
    with store_lock(store, "moram merge", break_lock=True):
        assert "(moram merge)" in lock_message(store)
    assert lock_message(store) is None


def test_leaving_the_lock_spares_a_lock_someone_else_took_meanwhile(store):
    with store_lock(store, "moram learn-task"):
        plant_lock(store, os.getpid(), host="elsewhere.example")
    assert "elsewhere.example" in lock_message(store)


def test_readers_take_no_lock(store, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "river?", "completion": "alpha"}] * 2)
    with store_lock(store, "moram learn-task"):
        assert runner.invoke(app, ["eval", str(store), "--data", str(data), "--json"]).exit_code == 0


def test_sigterm_while_the_model_loads_releases_the_lock(store, tiny_task, monkeypatch):
    import signal

    import moram_cli.training.learn as learn_module

    def terminated(*args, **kwargs):
        # What a scheduler sends; before training starts, nothing but the CLI handles it.
        os.kill(os.getpid(), signal.SIGTERM)

    before, handler = snapshot(store), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(learn_module, "build_memory_model", terminated)
    result = learn(store, tiny_task.train)
    assert result.exit_code == 130 and result.stderr.startswith("interrupted; the store is unchanged")
    assert not (store / LOCK_FILE).exists() and snapshot(store) == before
    assert signal.getsignal(signal.SIGTERM) == handler
