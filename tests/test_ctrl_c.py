"""Ctrl-C at any moment of a command ends in one line, exit code 130, the store unchanged (issue #21).

Typer turned a Ctrl-C during a command's imports into a silent exit 130, and
one during the import of typer itself printed a traceback. The moments are
reached by delays rather than hooks, so on a slow machine they fall earlier
in the command; each must give the same outcome wherever it falls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import snapshot
from moram_cli.command_signals import signals_as_interrupt
from moram_cli.entry import INTERRUPTED
from moram_cli.store.init import init_store

# The child installs the executable's SIGINT handler before saying it is ready, as `main` does first thing: a
# signal during the interpreter's own start, before any moram code runs, is Python's to report.
CHILD = """
import signal, sys
from moram_cli import entry
signal.signal(signal.SIGINT, entry.exit_at_once)
print("ready", flush=True)
sys.argv = ["moram", *sys.argv[1:]]
entry.main()
"""

# Seconds after the child is ready: typer's import, the command's imports (torch), the model loading under the lock.
DELAYS = (0.0, 0.3, 1.0, 2.0)


def test_ctrl_c_before_training_says_so_in_one_line(tmp_path, tiny_model_dir, tiny_task):
    stores = [tmp_path / f"store{i}" for i in range(len(DELAYS))]
    for store in stores:
        init_store(store, base_model=str(tiny_model_dir), r=2)
    before = [snapshot(store) for store in stores]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, "learn-task", str(store), "--data", str(tiny_task.train),
                                  "--epochs", "50", "--checkpoint-every", "0", "--json"],  # --json: no progress lines
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for store in stores]
    for child, delay in zip(children, DELAYS):
        assert child.stdout.readline() == "ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
    for child, store, snap in zip(children, stores, before):
        out, err = child.communicate(timeout=300)
        assert child.returncode == 130 and err.startswith(INTERRUPTED) and err.count("\n") == 1, err
        # On a fast machine the last may reach training, which keeps resume data by design (see test_resume).
        assert {name: data for name, data in snapshot(store).items() if not name.startswith(".staging")} == snap


def test_an_interrupt_that_python_drops_is_raised_again():
    """A KeyboardInterrupt raised in a `__del__` or weakref callback (as imports run) is dropped by Python."""

    class DropsItsInterrupt:
        def __del__(self):
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt():
        DropsItsInterrupt()
        time.sleep(30)
    assert time.monotonic() - started < 20
