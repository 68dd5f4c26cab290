"""`moram eval`'s throughput at another commit and at this checkout, interleaved on one store and one test file.

Each round runs the command once per code version, in turn, in a fresh
interpreter (imports, model load and scoring all counted, as a user waits
for them); medians are reported with examples per second and each version's
accuracy, which must agree. The other commit is checked out into a temporary
git worktree and runs on this checkout's environment.

    python bench/eval_before_after.py --store STORE --data dbpedia-100.jsonl --before f84721f
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cl_benchmark import REPO, _say, script_main, write_reports


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="a learned store both versions can read")
    p.add_argument("--data", type=Path, required=True, help="a labelled JSONL test file with labels.json beside it")
    p.add_argument("--before", required=True, help="the commit to compare with")
    p.add_argument("--scorings", default="choice,generate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--results-name", default="eval-before-after")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def timed_eval(code: Path, store: Path, data: Path, scoring: str) -> tuple[float, float]:
    """Seconds and accuracy of one `moram eval --json` run with `code` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moram_cli", "eval", str(store), "--data", str(data), "--scoring", scoring, "--json"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"eval at {code} failed: {done.stderr.strip()[-500:]}")
    return seconds, json.loads(done.stdout)["accuracy"]


def before_after(args: argparse.Namespace) -> dict:
    examples = sum(1 for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip())
    after = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.before], check=True, capture_output=True)
        try:
            result = {scoring: compare({"before": old, "after": REPO}, args, scoring, examples) for scoring in args.scorings.split(",")}
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=True)
    return {"before": args.before, "after": after, "store": str(args.store), "data": str(args.data), "examples": examples,
            "rounds": args.rounds, "cpus": os.cpu_count(), "scorings": result}


def compare(codes: dict[str, Path], args: argparse.Namespace, scoring: str, examples: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in codes}
    accuracy: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, code in codes.items():
            seconds, accuracy[name] = timed_eval(code, args.store, args.data, scoring)
            times[name].append(seconds)
            _say(args, f"{scoring} {name}: {seconds:.1f} s, accuracy {accuracy[name]:.3f}")
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"seconds": times, "examples_per_second": {name: round(examples / s, 3) for name, s in median.items()},
            "speed_up": round(median["before"] / median["after"], 3), "accuracy": accuracy}


def write_results(result: dict, args: argparse.Namespace) -> list[Path]:
    return write_reports(result, args.results_dir, args.results_name)


def main(argv: list[str] | None = None) -> int:
    return script_main(parse_args(argv), before_after, write_results)


if __name__ == "__main__":
    sys.exit(main())
