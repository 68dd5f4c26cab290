"""CI gates on an evaluation result: `--min-accuracy` and `--max-forgetting` (exit code 1 when one is missed)."""

from __future__ import annotations

from moram_cli.errors import GateViolation

# Accuracies are ratios and forgetting a difference of two: a value equal to the gate in decimal may sit a hair off in binary.
TOLERANCE = 1e-9


def eval_mode(result: dict) -> str:
    """Which mode produced `result`: "cl" (an accuracy matrix), "suite" (lm-eval scores) or "data" (one test set)."""
    return "cl" if "matrix" in result else "suite" if "results" in result else "data"


def gated_accuracies(result: dict) -> list[tuple[str, float | None]]:
    """What --min-accuracy applies to: the accuracy on --data, the average accuracy of --suite cl, or each lm-eval task's acc."""
    if eval_mode(result) == "cl":
        return [("average accuracy", result["average_accuracy"]["value"])]
    if eval_mode(result) == "suite":
        return [(f"{task} acc", scores.get("acc")) for task, scores in result["results"].items()]
    return [("accuracy", result["accuracy"])]


def check_gates(result: dict, min_accuracy: float | None = None, max_forgetting: float | None = None) -> dict:
    """Raise GateViolation naming the first gate `result` misses; returns `result` when it meets them all."""
    for what, value in gated_accuracies(result) if min_accuracy is not None else []:
        if value is None:
            raise GateViolation(f"{what} was not measured, so --min-accuracy {min_accuracy:g} is not met")
        if value < min_accuracy - TOLERANCE:
            raise GateViolation(f"{what} {value:.3f} is below --min-accuracy {min_accuracy:g}")
    worst = result.get("max_forgetting") if max_forgetting is not None else None
    if worst is not None and worst > max_forgetting + TOLERANCE:
        task = result["tasks"][result["forgetting"].index(worst)]["task"]
        raise GateViolation(f"forgetting {worst:.3f} on task {task} is above --max-forgetting {max_forgetting:g}")
    return result
