"""The `moram` executable's entry point: a Ctrl-C at any moment ends in one line and exit code 130.

Until a command starts its work (see `cli.run`) nothing is held and nothing
is written, so SIGINT ends the process on the spot. A KeyboardInterrupt
would not do: typer turned one raised during a command's imports (torch:
seconds) into a silent exit 130, and one raised inside a callback that
runs during an import is dropped, so the command ran on.
"""

from __future__ import annotations

import os
import signal
import sys

from moram_cli.errors import report_failure

INTERRUPTED = "interrupted; the store is unchanged"
INTERRUPTED_AFTER_WORK = "interrupted while printing the result; the command had finished"

_work_done = False


def main() -> None:
    """Run the `moram` command line."""
    signal.signal(signal.SIGINT, exit_at_once)
    from moram_cli.cli import app  # typer and rich: most of a second on a busy machine

    app(prog_name="moram")


def work_done() -> None:
    """Record that the command's work is over: an interrupt from now on cut only its output short."""
    global _work_done
    _work_done = True


def exit_at_once(signum: int, frame) -> None:
    """SIGINT while no command is at work: say so and end the process."""
    message = INTERRUPTED_AFTER_WORK if _work_done else INTERRUPTED
    try:
        sys.stdout.flush()  # what the result had printed so far
    except (OSError, ValueError):
        pass
    if not report_failure(message, 130):
        print(message, file=sys.stderr, flush=True)
    os._exit(130)
