"""The README's main job: a two-task continual-learning run on the embedded model and shipped data."""

from __future__ import annotations

import time
from pathlib import Path

from moram_cli.evaluation.evaluate import evaluate_store
from moram_cli.reporting import accuracy_matrix_table, console
from moram_cli.store.init import init_store
from moram_cli.training.learn import learn_task

DEMO_DATA = Path(__file__).parent / "demo_data"
DEMO_TASKS = ("dbpedia", "amazon")


def run_demo(store: Path, show_progress: bool = True) -> dict:
    """init -> eval zero-shot -> learn dbpedia -> eval -> learn amazon -> eval; returns the accuracy matrix."""
    started = time.time()
    init_store(store)
    stages = [("zero-shot", _accuracies(store, show_progress))]
    _say(show_progress, f"zero-shot accuracy: {_row(stages[-1][1])}")
    for i, task in enumerate(DEMO_TASKS, start=1):
        _say(show_progress, f"learning task {i}: {task}")
        learn_task(store, DEMO_DATA / task / "train.jsonl", name=task, show_progress=show_progress)
        stages.append((f"after {task}", _accuracies(store, show_progress)))
        _say(show_progress, f"accuracy after {task}: {_row(stages[-1][1])}")
    result = {"store": str(store), "tasks": list(DEMO_TASKS), "rows": [{"stage": s, "accuracy": a} for s, a in stages],
              "wall_seconds": round(time.time() - started, 1)}
    if show_progress:
        console.print(accuracy_matrix_table(list(DEMO_TASKS), stages, "accuracy on each task's test set (ranked choice)"))
        console.print(f"total time {result['wall_seconds'] / 60:.1f} min; inspect the store: ls {store}/banks")
    return result


def _accuracies(store: Path, show_progress: bool) -> list[float]:
    return [evaluate_store(store, DEMO_DATA / t / "test.jsonl", show_progress=show_progress)["accuracy"] for t in DEMO_TASKS]


def _row(accuracies: list[float]) -> str:
    return ", ".join(f"{t} {a:.3f}" for t, a in zip(DEMO_TASKS, accuracies))


def _say(enabled: bool, message: str) -> None:
    if enabled:
        console.print(f"[bold]{message}[/]")
