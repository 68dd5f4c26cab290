"""Markdown versions of results, for reports: `moram eval --markdown` and the benchmark's tables."""

from __future__ import annotations

from moram_cli.evaluation.ci_gates import eval_mode
from moram_cli.evaluation.cl_metrics import matrix_rows, metric_lines, shown


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; a `|` inside a cell is escaped."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines)


def eval_markdown(result: dict) -> str:
    """What `moram eval` found, as Markdown: the rows of its terminal table, and for the matrix the metrics with their definitions."""
    mode = eval_mode(result)
    if mode == "cl":
        tasks = [t["task"] for t in result["tasks"]]
        rows = [[stage, *map(shown, cells), *[""] * (len(tasks) - len(cells))] for stage, cells in matrix_rows(result)]
        return markdown_table(["stage", *tasks], rows) + "\n\n" + "\n".join(f"- {line}" for line in metric_lines(result))
    if mode == "suite":
        rows = [[task, shown(s.get("acc")), shown(s.get("acc_norm")), str(s["n"])] for task, s in result["results"].items()]
        return markdown_table(["task", "acc", "acc_norm", "n"], rows)
    row = [result["data"], ", ".join(result["banks"]) or "base model", result["scoring"], shown(result["accuracy"]), f"{result['correct']}/{result['total']}"]
    return markdown_table(["data", "banks", "scoring", "accuracy", "correct"], [row])
