"""Commands that load no model start at once: they never import torch, transformers, peft or accelerate (issue #20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import moram_cli
from conftest import random_bank
from moram_cli.store import MemoryStore
from moram_cli.store.bank import PROTOTYPE
from moram_cli.store.init import init_store

HEAVY = ("torch", "transformers", "peft", "accelerate")

# Run in a fresh interpreter (this one imported torch long ago): each command as `moram` runs it, then the heavy
# libraries loaded so far. Output goes to a file, away from the commands' own.
PROBE = """
import json, sys
from moram_cli.cli import app

commands, heavy, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
runs = []
for args in commands:
    try:
        app(args, prog_name="moram")
    except SystemExit as exit:
        runs.append({"args": args, "code": exit.code or 0, "heavy": [m for m in heavy if m in sys.modules]})
with open(out, "w") as fh:
    json.dump(runs, fh)
"""


def run_fresh(commands: list[list[str]], tmp_path: Path) -> list[dict]:
    """Each command's exit code and the heavy libraries imported by the time it ended, all in one new interpreter."""
    out = tmp_path / "probe.json"
    # The subprocess imports the moram_cli these tests import, wherever it lies.
    source = str(Path(moram_cli.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands), json.dumps(HEAVY), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def recorded_store(path: Path, model: Path) -> Path:
    """A task-routed store of two banks with prototypes and accuracy records, written without training."""
    init_store(path, base_model=str(model), r=4, k=2)
    store, tasks = MemoryStore.open(path), ["one", "two"]
    for i, task in enumerate(tasks):
        bank = random_bank(4, i)
        record = {"test": {"data": f"/data/{task}/test.jsonl", "data_sha256": "0" * 64, "scoring": "choice", "examples": 6},
                  "before": 0.3, "zero_shot": 0.3, "row": dict(zip(tasks, [[0.8], [0.7, 0.9]][i]))}
        store.add_bank(task, bank, {"cl": record}, {PROTOTYPE: {module: torch.randn(A.shape[1]) for module, (A, _) in bank.items()}})
    return path


def test_commands_that_load_no_model_import_no_torch(tmp_path, tiny_model_dir):
    store = str(recorded_store(tmp_path / "store", tiny_model_dir))
    new, missing = str(tmp_path / "new"), str(tmp_path / "missing")
    expected = {
        ("--help",): 0,
        ("--version",): 0,
        ("verify", store): 0,
        ("eval", store, "--suite", "cl"): 0,
        ("inspect-ranks", store): 0,
        ("init", new, "--base-model", str(tiny_model_dir)): 0,
        # Error paths: a missing store, a usage error, missing data, a filter that matches nothing, a taken directory.
        ("verify", missing): 2,
        ("eval", store): 2,
        ("eval", store, "--data", str(tmp_path / "missing.jsonl")): 2,
        ("inspect-ranks", store, "--module", "no_such_module"): 2,
        ("init", store, "--base-model", str(tiny_model_dir)): 2,
    }
    runs = run_fresh([list(args) for args in expected], tmp_path)
    assert [(tuple(run["args"]), run["code"]) for run in runs] == list(expected.items())
    assert [run for run in runs if run["heavy"]] == []
    assert (tmp_path / "new" / "store.yaml").is_file()


def test_the_heavy_libraries_still_load_where_a_model_is_built(tmp_path, tiny_model_dir, tiny_task):
    """The probe can see an import: eval on a test set builds the model, and with it torch and transformers come in."""
    store = str(recorded_store(tmp_path / "store", tiny_model_dir))
    [run] = run_fresh([["eval", store, "--data", str(tiny_task.test), "--json"]], tmp_path)
    assert run["code"] == 0 and {"torch", "transformers", "peft"} <= set(run["heavy"])
