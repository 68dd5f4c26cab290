"""Progress on stderr: a rich bar in a terminal, plain lines in a log (training's own bar: `training.progress`).

Rich draws nothing when stderr is not a terminal, so a long eval or
training run in CI printed nothing for minutes. There a phase prints
`eval on dbpedia/test.jsonl (choice): 32/100 (41 s)` each time it passes
another tenth of its work, or after a minute without a line: no escape
codes, no carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LINES_PER_PHASE = 10
EVERY_SECONDS = 60.0


@dataclass
class _Phase:
    """One `add_task` of a `LineProgress`: how far it is, and when it last printed."""

    description: str
    total: float
    completed: float
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    parts: int = field(init=False)

    def __post_init__(self) -> None:
        self.parts = self.part_done()  # a resumed run starts part of the way

    def part_done(self) -> int:
        """How many of the phase's `LINES_PER_PHASE` parts are done (integers: 0.3 / 0.1 is 2.999...)."""
        return int(self.completed * LINES_PER_PHASE // self.total) if self.total > 0 else 0


class LineProgress:
    """The calls of rich's `Progress` that moram makes (`add_task`, `advance`, `update`), printed as lines.

    `describe_fields` turns a task's fields into the line's tail, e.g. `loss 1.2345, 310 tok/s` while training.
    """

    def __init__(self, describe_fields: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.describe_fields = describe_fields
        self.phases: list[_Phase] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def add_task(self, description: str, total: float, completed: float = 0, **fields: Any) -> int:
        self.phases.append(_Phase(description, total, completed, fields))
        return len(self.phases) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, advance: float = 0, **fields: Any) -> None:
        phase = self.phases[task]
        phase.completed += advance
        phase.fields.update(fields)
        now, parts = time.monotonic(), phase.part_done()
        if parts > phase.parts or now - phase.last_line >= EVERY_SECONDS:
            phase.parts, phase.last_line = parts, now
            self._print(phase, now)

    def _print(self, phase: _Phase, now: float) -> None:
        line = f"{phase.description}: {phase.completed:g}/{phase.total:g} ({now - phase.started:.0f} s)"
        if self.describe_fields is not None:
            line += f", {self.describe_fields(phase.fields)}"
        print(line, file=sys.stderr, flush=True)


def phase_progress(enabled: bool, transient: bool = False) -> Progress | LineProgress:
    """A bar for a phase other than training (an evaluation, the data pass of `data` keys); disabled, it prints nothing.

    A `transient` bar leaves the terminal when its phase ends.
    """
    if enabled and not stderr_is_terminal():
        return LineProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=transient, disable=not enabled)


def stderr_is_terminal() -> bool:
    return Console(stderr=True).is_terminal
