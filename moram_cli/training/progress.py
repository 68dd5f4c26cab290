"""The live training display: a rich progress bar with loss, tokens/s and ETA (on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.text import Text


class LossColumn(ProgressColumn):
    """`loss 1.2345`, or `loss –` while the task's `loss` field is None: before the first step ends there is no loss yet.

    The bar's first frame used to show `loss nan`, which reads as a run that diverged.
    """

    def render(self, task: Task) -> Text:
        loss = task.fields.get("loss")
        return Text("loss –" if loss is None else f"loss {loss:.4f}")


def training_progress(enabled: bool) -> Progress:
    """A progress display; disabled ones accept the same calls and print nothing."""
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


def phase_progress(enabled: bool) -> Progress:
    """A plain bar for a phase before training (e.g. the data pass of `data` keys), on stderr."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)
