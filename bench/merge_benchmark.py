"""Merging independently trained stores: each task's accuracy from its own store and from the merged store.

One store per task learns that task alone (the `moram init` defaults on the
embedded SmolLM2-135M-Instruct unless told otherwise); `moram merge` then
combines them without retraining, once with each routing, and every store is
scored on every task it holds, on the same test files. The defaults use the
sample shipped in moram_cli/demo_data (300 training and 100 test examples of
dbpedia and amazon) and take about 10 minutes on 2 CPU cores.

    python bench/merge_benchmark.py                     # from the repository root, in the project's .venv
    python bench/merge_benchmark.py --tasks-dir ../shared/data/cl-benchmark --tasks dbpedia,amazon,yelp
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from moram_cli import __version__
from moram_cli.curation.merge import merge_stores
from moram_cli.errors import MoramError
from moram_cli.evaluation.evaluate import evaluate_store
from moram_cli.markdown import markdown_table
from moram_cli.store.init import init_store
from moram_cli.store.merge import MERGE_ROUTINGS
from moram_cli.training.learn import learn_task

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks-dir", type=Path, default=REPO / "moram_cli" / "demo_data", help="folder of <task>/{train,test}.jsonl")
    p.add_argument("--tasks", default="dbpedia,amazon", help="comma-separated tasks: one source store each")
    p.add_argument("--base-model", default=None, help="as for moram init; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="every source store's seed, as two users running the defaults would have")
    p.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work-merge", help="the stores (replaced on every run)")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def benchmark(args: argparse.Namespace) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    started, own, sources = time.time(), {}, []
    for task in tasks:
        store = args.work_dir / task
        init_store(store, base_model=args.base_model, seed=args.seed)
        learn_task(store, args.tasks_dir / task / "train.jsonl", name=task, epochs=args.epochs, show_progress=False)
        own[task] = _accuracy(store, args, task)
        sources.append(store)
    merged = {}
    for routing in MERGE_ROUTINGS:
        out = args.work_dir / f"merged-{routing}"
        merge_stores(out, sources, routing=routing)
        merged[routing] = {task: _accuracy(out, args, task) for task in tasks}
    return {"model": args.base_model or "SmolLM2-135M-Instruct (embedded)", "tasks": tasks, "tasks_dir": str(args.tasks_dir),
            "settings": {"epochs": args.epochs, "seed": args.seed, "store_defaults": "moram init", "tool_version": __version__},
            "own_store": own, "merged": merged, "wall_seconds": round(time.time() - started, 1)}


def _accuracy(store: Path, args: argparse.Namespace, task: str) -> float:
    return evaluate_store(store, args.tasks_dir / task / "test.jsonl", show_progress=False)["accuracy"]


def markdown_report(result: dict) -> str:
    """One row per task: accuracy from its own store, from each merged store, and the change."""
    rows = []
    for task in result["tasks"]:
        own = result["own_store"][task]
        merged = [result["merged"][routing][task] for routing in MERGE_ROUTINGS]
        rows.append([task, f"{own:.3f}", *(f"{acc:.3f} ({acc - own:+.3f})" for acc in merged)])
    return markdown_table(["task", "own store", *(f"merged, routing {r}" for r in MERGE_ROUTINGS)], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = benchmark(args)
    except MoramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "merge.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.results_dir / "merge.md").write_text(markdown_report(result))
    print(args.results_dir / "merge.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
