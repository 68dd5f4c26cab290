"""The training display on stderr: a rich bar with loss, tokens/s and ETA in a terminal, plain lines in a log."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.text import Text

from moram_cli.progress import LineProgress, stderr_is_terminal


class LossColumn(ProgressColumn):
    """`loss 1.2345`, or `loss –` while the task's `loss` field is None: before the first step ends there is no loss yet.

    The bar's first frame used to show `loss nan`, which reads as a run that diverged.
    """

    def render(self, task: Task) -> Text:
        loss = task.fields.get("loss")
        return Text("loss –" if loss is None else f"loss {loss:.4f}")


def training_progress(enabled: bool) -> Progress | LineProgress:
    """A progress display; disabled ones accept the same calls and print nothing."""
    if enabled and not stderr_is_terminal():
        return LineProgress(_training_fields)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        LossColumn(),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def _training_fields(fields: dict[str, Any]) -> str:
    return f"loss {fields['loss']:.4f}, {fields['tps']:,.0f} tok/s"  # a line follows a step: the loss is known
