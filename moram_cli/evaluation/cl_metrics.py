"""Continual-learning metrics over an accuracy matrix: pure functions, each stating how it was averaged.

`R[i][j]` is the accuracy on task j after learning task i (0-based here,
tasks 1..T in the formulas), kept for j <= i; `before[j]` is the accuracy on
task j just before it was learned (R[j-1][j]); `zero_shot[j]` the base
model's. A cell may be None (its test set was gone or changed): every mean
then skips the terms it spoils and says how many it kept.
"""

from __future__ import annotations

from collections.abc import Iterable

Cell = float | None
Matrix = list[list[Cell]]

AVERAGE_ACCURACY = "1/T Σ_j R[T][j]"
BACKWARD_TRANSFER = "1/(T-1) Σ_{j<T} (R[T][j] - R[j][j])  (GEM)"
FORWARD_TRANSFER = "1/(T-1) Σ_{j>=2} (R[j-1][j] - zero_shot[j])"
FORGETTING = "max_{j<=l<T} R[l][j] - R[T][j], for j < T"
REPORTED = (("average accuracy", "average_accuracy"), ("BWT", "bwt"), ("FWT", "fwt"))


def mean(values: Iterable[Cell]) -> dict:
    """`{"value", "denominator"}`: the mean of the cells that are not None, and how many there were."""
    kept = [v for v in values if v is not None]
    return {"value": sum(kept) / len(kept) if kept else None, "denominator": len(kept)}


def difference(a: Cell, b: Cell) -> Cell:
    return None if a is None or b is None else a - b


def average_accuracy(R: Matrix) -> dict:
    """Mean accuracy over all tasks after the last one was learned."""
    return mean(R[-1]) | {"formula": AVERAGE_ACCURACY}


def backward_transfer(R: Matrix) -> dict:
    """How learning later tasks changed the earlier ones (negative: forgetting); None for a single task."""
    last = R[-1]
    return mean(difference(last[j], R[j][j]) for j in range(len(R) - 1)) | {"formula": BACKWARD_TRANSFER}


def forward_transfer(before: list[Cell], zero_shot: list[Cell]) -> dict:
    """How much the tasks learned so far helped each new task before it was learned, against the base model."""
    return mean(difference(before[j], zero_shot[j]) for j in range(1, len(before))) | {"formula": FORWARD_TRANSFER}


def forgetting(R: Matrix) -> list[Cell]:
    """Per task: its best accuracy before the last task minus its last; None for the last task."""
    last = R[-1]
    per_task = []
    for j in range(len(R) - 1):
        earlier = [R[i][j] for i in range(j, len(R) - 1) if R[i][j] is not None]
        per_task.append(None if not earlier or last[j] is None else max(earlier) - last[j])
    return per_task + [None]


def matrix_rows(report: dict) -> list[tuple[str, list[Cell]]]:
    """The rows shown for a `--suite cl` report: zero-shot, one per learned task (R[i][1..i]), forgetting."""
    tasks = [t["task"] for t in report["tasks"]]
    return [("zero-shot", report["zero_shot"]), *((f"after {t}", row) for t, row in zip(tasks, report["matrix"])),
            ("forgetting", report["forgetting"])]


def metric_lines(report: dict) -> list[str]:
    """The report's metrics in words, each with its formula and the number of terms it averaged."""
    lines = []
    for name, key in REPORTED:
        metric = report[key]
        lines.append(f"{name} {shown(metric['value'])} = {metric['formula']}, over {metric['denominator']} term(s)")
    return lines + [f"largest forgetting {shown(report['max_forgetting'])}, per task = {FORGETTING}"]


def shown(value: Cell) -> str:
    """A cell or metric as printed: three decimals, or n/a when it was not measured or is not defined."""
    return "n/a" if value is None else f"{value:.3f}"
