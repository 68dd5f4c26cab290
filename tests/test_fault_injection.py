"""SIGKILL a real `learn-task` process at 20 instants; the store must survive each, and recovery must give the same bank.

The learn-task runs in a child process. At five instants it is killed a share
of an uninterrupted run's lock time after its lock file appears (model
loading, training, bank writing: wherever the machine's speed puts them); at
fifteen it is killed while paused at a named point of the run: this file, run
as a script, installs a pause there, reports that it got there and waits for
the SIGKILL from this test. After every kill the store must open with the
old or the new bank set and pass `verify_store`, and recovery — `--resume`
when resume data exists, a fresh run otherwise, `--break-lock` only when
moram asks for it — must write the bank that an uninterrupted run writes,
byte for byte. The outcomes are printed and written to `fault_outcomes.json`
in the test's temporary directory. test_distributed launches this file in
place of `-m moram_cli`, with `--rank N` so that only process N pauses.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

# Checkpoints every 2 of 18 steps, so kills land both on and between them; dropout makes the RNG state matter.
SETTINGS = ["--name", "t", "--epochs", "3", "--batch-size", "4", "--lr", "1e-2", "--lr-schedule", "cosine", "--checkpoint-every", "2"]
# Shares of the time an uninterrupted run holds its lock, measured: fixed delays that land
# mid-run on 2 busy cores come after the end on an idle one. The children run two at a time,
# no faster than the lone reference run, so even the last share kills before the end.
LOCK_SHARES = (0.0, 0.25, 0.5, 0.7, 0.85)


def _dst_name_starts(prefix: str):
    return lambda args: Path(args[1]).name.startswith(prefix)


def _path_name_starts(prefix: str):
    return lambda args: Path(args[0]).name.startswith(prefix)


# name -> (module, function, pause before or after the call, which call, which calls count)
PAUSES = {
    "lock held, data not yet read": ("moram_cli.training.learn", "read_examples", "before", 1, None),
    "loading the base model": ("moram_cli.training.learn", "build_memory_model", "before", 1, None),
    "model loaded, encoding the data": ("moram_cli.training.learn", "encode_dataset", "before", 1, None),
    "forward pass of step 1": ("moram_cli.training.loop", "completion_loss", "before", 1, None),
    "forward pass of step 3": ("moram_cli.training.loop", "completion_loss", "before", 3, None),
    "forward pass of step 10": ("moram_cli.training.loop", "completion_loss", "after", 10, None),
    "forward pass of step 18 (the last)": ("moram_cli.training.loop", "completion_loss", "after", 18, None),
    "checkpoint 1: temporary directory, no tensors yet": ("moram_cli.training.checkpoint", "save", "after", 1, None),
    "checkpoint 2: tensors written, state.yaml not": ("moram_cli.training.checkpoint", "write_yaml", "before", 2, None),
    "checkpoint 3: complete, before its rename": ("os", "replace", "before", 3, _dst_name_starts("step-")),
    "checkpoint 4: renamed, the one before not yet removed": ("shutil", "rmtree", "before", 3, _path_name_starts("step-")),
    # The bank imports save_file when it writes, so the pause replaces it where that import reads it.
    "bank: before its weights are written": ("safetensors.torch", "save_file", "before", 1, None),
    "bank: weights written, bank.yaml not": ("moram_cli.store.bank", "write_yaml", "before", 1, None),
    "bank: complete in staging, before its rename": ("os", "replace", "before", 1, _dst_name_starts("002-")),
    "bank renamed into place, resume data not yet removed": ("shutil", "rmtree", "before", 1, _path_name_starts("resume-")),
}


def _install_pause(name: str, marker: Path) -> None:
    """Make the named call report to `marker` and wait to be killed (run in the child process)."""
    module_name, attribute, when, nth, counts = PAUSES[name]
    module = importlib.import_module(module_name)
    real, seen = getattr(module, attribute), [0]

    def paused(*args, **kwargs):
        seen[0] += counts is None or counts(args)
        if when == "before" and seen[0] == nth and (counts is None or counts(args)):
            _wait_for_the_kill(marker)
        result = real(*args, **kwargs)
        if when == "after" and seen[0] == nth and (counts is None or counts(args)):
            _wait_for_the_kill(marker)
        return result

    setattr(module, attribute, paused)


def _wait_for_the_kill(marker: Path) -> None:
    marker.write_text(str(os.getpid()))  # which process to kill, where a launch started several
    time.sleep(600)


def _start(command: list[str]) -> subprocess.Popen:
    """Start a learn-task child with one thread, as the recovery runs in this process use."""
    return subprocess.Popen(command, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill(command: list[str], instant: str, marker: Path) -> str:
    """Run `command`, SIGKILL it at `instant` (seconds after `marker` appears, or a pause named in PAUSES); says what happened."""
    child = _start(command)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None and not marker.exists():
        time.sleep(0.001)
    if instant[0].isdigit():
        time.sleep(float(instant))
    if child.poll() is not None:
        return f"finished before the kill (exit {child.returncode}): {child.stderr.read().strip()[-300:]}"
    if not marker.exists():
        child.kill()
        return "too late: the lock was released" if instant[0].isdigit() else "never got there"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    return "killed"


@contextmanager
def _one_thread():
    """Recovery runs in this process: pin its threads as the child's OMP_NUM_THREADS=1 does, for bitwise-equal sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _state(store: Path) -> dict:
    from moram_cli.store import MemoryStore
    from moram_cli.store.verify import verify_store

    banks = [bank.path.name for bank in MemoryStore.open(store).banks()]
    report = verify_store(store)
    assert report["ok"], report["problems"]
    resume = store / ".staging" / "resume-t"
    entries = sorted(p.name for p in resume.iterdir()) if resume.is_dir() else []
    # Only a renamed step-N directory is a checkpoint; a .tmp-* one is a write cut short.
    return {"banks": banks, "resume_data": [e for e in entries if e.startswith("step-")],
            "partial_checkpoints": len([e for e in entries if e.startswith(".tmp-")]),
            "lock": (store / ".lock").exists(), "warnings": len(report["warnings"])}


def _recover(store: Path, data: Path, found: dict) -> str:
    """Finish the task as a user would: --resume when there is resume data, else a fresh run; --break-lock if asked."""
    from typer.testing import CliRunner

    from moram_cli.cli import app

    if "002-t" in found["banks"] and not found["resume_data"]:
        return "nothing to do: the bank was complete"
    args = ["learn-task", str(store), "--data", str(data), *SETTINGS, "--json"] + (["--resume"] if found["resume_data"] else [])
    with _one_thread():
        result = CliRunner().invoke(app, args)
        how = "--resume" if found["resume_data"] else "fresh run"
        if result.exit_code == 2 and "--break-lock" in result.stderr:
            result = CliRunner().invoke(app, [*args, "--break-lock"])
            how += " --break-lock"
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    if "002-t" in found["banks"]:
        return f"{how}: the bank was written already; its leftover resume data removed"
    return f"{how}: resumed at step {summary['resumed_from_step']}" if "resumed_from_step" in summary else f"{how}: trained from step 0"


def _bank_hash(store: Path) -> str:
    return yaml.safe_load((store / "banks" / "002-t" / "bank.yaml").read_text())["weights_sha256"]


def _lock_seconds(command: list[str], lock: Path) -> float:
    """Run `command` to the end; how long it held `lock`."""
    child = _start(command)
    while child.poll() is None and not lock.exists():
        time.sleep(0.001)
    start = time.time()
    while child.poll() is None and lock.exists():
        time.sleep(0.001)
    held = time.time() - start
    assert child.wait(timeout=300) == 0, child.stderr.read()
    child.stderr.close()
    return held


@pytest.fixture
def base(tmp_path, tiny_model_dir, tiny_task) -> tuple[Path, str, float]:
    """A store holding one bank (the old bank set); the hash of the bank an uninterrupted child adds, and how long it held the lock."""
    from typer.testing import CliRunner

    from conftest import random_bank
    from moram_cli.cli import app
    from moram_cli.store import MemoryStore
    from moram_cli.store.bank import PROTOTYPE

    store = tmp_path / "base"
    assert CliRunner().invoke(app, ["init", str(store), "--base-model", str(tiny_model_dir), "--r", "4", "--k", "2", "--dropout", "0.1"]).exit_code == 0
    first = random_bank(4, seed=7)
    # A task-routed store (the default): every bank carries its task's prototypes.
    MemoryStore.open(store).add_bank("first", first, {"examples": 0}, {PROTOTYPE: {m: torch.full((A.shape[1],), 0.1) for m, (A, _) in first.items()}})
    shutil.copytree(store, tmp_path / "reference")
    reference = tmp_path / "reference"
    held = _lock_seconds([sys.executable, "-m", "moram_cli", "learn-task", str(reference), "--data", str(tiny_task.train), *SETTINGS, "--json"],
                         reference / ".lock")
    return store, _bank_hash(reference), held


@pytest.mark.slow  # 20 child processes of a few seconds each
def test_the_store_survives_sigkill_at_20_instants_and_resumes_to_the_same_bank(base, tiny_task, tmp_path):
    base, expected, held = base
    instants = [f"{share * held:.3f}" for share in LOCK_SHARES] + list(PAUSES)

    def run(number: int, instant: str) -> tuple[Path, str]:
        store = tmp_path / f"store{number:02d}"
        shutil.copytree(base, store)
        marker = store / ".lock" if instant[0].isdigit() else tmp_path / f"paused{number:02d}"
        command = [sys.executable, "-m", "moram_cli"] if instant[0].isdigit() else [sys.executable, __file__, instant, str(marker)]
        command += ["learn-task", str(store), "--data", str(tiny_task.train), *SETTINGS, "--json"]
        return store, _kill(command, instant, marker)

    # Two children at a time: each spends most of its life importing torch.
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = list(pool.map(run, range(len(instants)), instants))
    outcomes = []
    for instant, (store, kill) in zip(instants, killed):
        found = _state(store)
        assert found["banks"] in (["001-first"], ["001-first", "002-t"]), found
        if "002-t" in found["banks"]:
            assert _bank_hash(store) == expected
        recovery = _recover(store, tiny_task.train, found)
        after = _state(store)
        assert after["banks"] == ["001-first", "002-t"] and _bank_hash(store) == expected, (instant, after)
        assert not (store / ".staging" / "resume-t").exists() and not after["lock"]
        if instant[0].isdigit():
            instant = f"{instant} s after the lock appeared ({float(instant) / held:.0%} of the {held:.2f} s an uninterrupted run held it)"
        outcomes.append({"instant": instant, "kill": kill,
                         "found": found, "recovery": recovery, "bank_equals_uninterrupted": True})
    (tmp_path / "fault_outcomes.json").write_text(json.dumps(outcomes, indent=2))
    for o in outcomes:
        print(f"{o['instant']:<55} {o['kill']:<8} banks={len(o['found']['banks'])} resume={o['found']['resume_data'][-1:] or '-'} "
              f"lock={o['found']['lock']} -> {o['recovery']}")
    assert all(o["kill"] == "killed" for o in outcomes[len(LOCK_SHARES):]), "every pause must be reached and killed"


if __name__ == "__main__":
    # The child process: pause at the named point, then be learn-task. `--rank N` first: a launched
    # process (this file in place of `-m moram_cli`) pauses only if it is process N.
    args = sys.argv[1:]
    rank, args = (args[1], args[2:]) if args[0] == "--rank" else (None, args)
    if rank in (None, os.environ.get("RANK")):
        _install_pause(args[0], Path(args[1]))
    from moram_cli.entry import main

    sys.argv = ["moram", *args[2:]]
    main()
