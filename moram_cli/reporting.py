"""Rich tables for the commands' results (the `--json` output carries the same data)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()


def learn_table(result: dict) -> Table:
    table = Table(title=f"learned task {result['task']}", show_header=False)
    loss = result["loss"]
    rows = [
        ("bank", result.get("bank", "")),
        ("examples", f"{result['examples']} ({result['truncated_examples']} prompts cut to --max-length)"),
        ("steps / tokens", f"{result['steps']} / {result['tokens']:,}"),
        ("new parameters", f"{result['trainable_parameters']:,} ({result['new_ranks_per_module']} ranks per module)"),
        ("loss first / last / mean", f"{loss['first']:.4f} / {loss['last']:.4f} / {loss['mean']:.4f}"),
        ("wall time", f"{result['wall_seconds']:.1f} s"),
    ]
    if "eval" in result:
        ev = result["eval"]
        rows.append(("eval accuracy", f"{ev['accuracy']:.3f} ({ev['correct']}/{ev['total']}, {ev['scoring']})"))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def eval_table(result: dict) -> Table:
    banks = ", ".join(result["banks"]) or "none (base model)"
    table = Table(title=f"evaluation of {result['store']}")
    for column in ("data", "banks", "scoring", "accuracy", "correct"):
        table.add_column(column)
    table.add_row(result["data"], banks, result["scoring"], f"{result['accuracy']:.3f}", f"{result['correct']}/{result['total']}")
    return table


def accuracy_matrix_table(tasks: list[str], rows: list[tuple[str, list[float]]], title: str) -> Table:
    """One row per stage (zero-shot, after task 1, ...), one column per task."""
    table = Table(title=title)
    table.add_column("stage")
    for task in tasks:
        table.add_column(task, justify="right")
    for stage, accuracies in rows:
        table.add_row(stage, *(f"{a:.3f}" for a in accuracies))
    return table
