"""Start-up time of the commands that load no model, and whether they import torch (issue #20).

    python bench/startup.py                              # this checkout; writes bench/results/startup.json
    python bench/startup.py --baseline ../moram-before   # and an older checkout, as the seconds_before figures

A baseline is any directory holding an older `moram_cli` package, e.g. `git archive COMMIT moram_cli | tar -x -C DIR`.
Each command runs `--repeats` times in a fresh interpreter, as `moram` runs it (the checkouts taking turns), and the
fastest wall time counts: the run least disturbed by whatever else the machine does; its CPU time, which such load
inflates less, comes beside it. One more run under `python -X importtime` tells whether torch was imported and which
top-level imports cost the most. The store is a throwaway one: three banks in SmolLM2-135M's
shapes (q and k projections of its 30 layers, 8 ranks each) with task prototypes and accuracy records, written without
training, on a base model directory that holds only a config (none of these commands loads the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEAVY = ("torch", "transformers", "peft", "accelerate")
LAYERS, HIDDEN, KV = 30, 576, 192  # SmolLM2-135M: 30 layers, 576 features, 3 key-value heads of 64
# Name -> (arguments, expected exit code); {n} makes a fresh directory per run for init.
COMMANDS = {
    "help": (["--help"], 0),
    "version": (["--version"], 0),
    "verify": (["verify", "store"], 0),
    "eval_suite_cl": (["eval", "store", "--suite", "cl"], 0),
    "inspect_ranks": (["inspect-ranks", "store"], 0),
    "init_local_model": (["init", "new-{n}", "--base-model", "model"], 0),
    "error_missing_store": (["verify", "missing"], 2),
}


def build_store(work: Path) -> None:
    """The store and model directory the commands run on, in `work`."""
    import torch

    from moram_cli.store import MemoryStore
    from moram_cli.store.bank import PROTOTYPE
    from moram_cli.store.init import init_store

    (work / "model").mkdir()
    (work / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS}))
    init_store(work / "store", base_model=str(work / "model"))
    store, tasks = MemoryStore.open(work / "store"), ["one", "two", "three"]
    generator = torch.Generator().manual_seed(0)
    for i, task in enumerate(tasks):
        bank = {f"model.layers.{layer}.self_attn.{name}": (torch.randn(8, HIDDEN, generator=generator), torch.randn(d_out, 8, generator=generator))
                for layer in range(LAYERS) for name, d_out in (("q_proj", HIDDEN), ("k_proj", KV))}
        test = {"data": f"/data/{task}/test.jsonl", "data_sha256": "0" * 64, "scoring": "choice", "examples": 80}
        record = {"test": test, "before": 0.3, "zero_shot": 0.3, "row": dict.fromkeys(tasks[: i + 1], 0.8)}
        store.add_bank(task, bank, {"cl": record}, {PROTOTYPE: {module: torch.randn(HIDDEN, generator=generator) for module in bank}})


def run(checkout: Path, work: Path, args: list[str], expect: int, *extra: str) -> tuple[float, float, str]:
    """Wall and CPU (user + system) seconds of `moram ARGS` with `checkout` first on the path, and its stderr."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "MORAM_CACHE": str(work / "cache"), "COLUMNS": "120"}
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *extra, "-m", "moram_cli", *args], cwd=work, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != expect:
        raise SystemExit(f"{checkout}: moram {' '.join(args)} exited {done.returncode}, not {expect}: {done.stderr[-500:]}")
    return seconds, now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime, done.stderr


def import_costs(importtime: str) -> tuple[set[str], dict[str, float]]:
    """From `-X importtime` output: every module imported, and the seconds of each top-level import (with what it imported)."""
    modules, top = set(), {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        modules.add(name.strip())
        if not name.startswith("  "):  # one space before a top-level name, two more per level of nesting
            top[name.strip()] = int(cumulative) / 1e6
    return modules, top


def measure(checkouts: dict[str, Path], work: Path, repeats: int) -> dict[str, dict[str, dict]]:
    """Per checkout and command: the fastest wall and CPU seconds, whether torch came in, the heavy libraries, the costliest imports."""
    results = {label: {} for label in checkouts}
    for name, (args, expect) in COMMANDS.items():
        times = {label: [] for label in checkouts}
        for i in range(repeats):  # the checkouts take turns, so that both meet the same background load
            for label, checkout in checkouts.items():
                times[label].append(run(checkout, work, [a.format(n=f"{label}-{i}") for a in args], expect)[:2])
        for label, checkout in checkouts.items():
            *_, importtime = run(checkout, work, [a.format(n=f"{label}-importtime") for a in args], expect, "-X", "importtime")
            modules, top = import_costs(importtime)
            walls, cpus = zip(*times[label])
            results[label][name] = {
                "seconds": round(min(walls), 3), "cpu_seconds": round(min(cpus), 3),
                "imports_torch": "torch" in modules, "heavy_imports": [m for m in HEAVY if m in modules],
                "top_imports": {m: round(s, 3) for m, s in sorted(top.items(), key=lambda kv: -kv[1])[:5]},
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="An older checkout (a git worktree) to measure as well, as the 'before' figures.")
    parser.add_argument("--repeats", type=int, default=5, help="Runs per command; the fastest counts.")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moram-startup-") as tmp:
        work = Path(tmp)
        build_store(work)
        load = [os.getloadavg()[0]]
        checkouts = {"before": options.baseline.resolve()} if options.baseline else {}
        measured = measure({**checkouts, "after": REPO}, work, options.repeats)
        load.append(os.getloadavg()[0])
    fields = ("seconds", "cpu_seconds", "imports_torch", "heavy_imports", "top_imports")
    commands = {name: {"argv": " ".join(["moram", *args]).replace("{n}", "N"),
                       **{f"{field}_{label}": measured[label][name][field] for field in fields for label in measured}}
                for name, (args, _) in COMMANDS.items()}
    report = {
        "about": "Wall seconds of each command in a fresh interpreter, fastest of `repeats` runs (bench/startup.py); cpu_seconds: "
                 "its user + system time, fastest run, which background load inflates less (on an idle machine, about its wall time); "
                 "top_imports: the five costliest top-level imports, in seconds with all they imported, "
                 "of one run under python -X importtime (which adds overhead of its own).",
        "machine": {"cpus": os.cpu_count(), "load_average_1min": [round(x, 2) for x in load], "python": sys.version.split()[0]},
        "repeats": options.repeats, "commands": commands,
    }
    options.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({name: {k: v for k, v in c.items() if k.startswith(("seconds", "cpu_seconds", "imports_torch"))} for name, c in commands.items()}, indent=1))


if __name__ == "__main__":
    main()
