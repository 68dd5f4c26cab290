"""Ctrl-C and SIGTERM while a command is at work: a KeyboardInterrupt, so that its `finally` blocks run.

Those release the store's lock and remove half-written files; SIGTERM's
default action, and the `moram` executable's SIGINT handler outside a
command's work (see `entry`), end the process on the spot. Training
installs its own handler (finish the step, save, stop) over this one.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# How long a dropped interrupt waits to be raised again: long enough to be out of the callback that dropped it.
REDELIVERY_DELAY_S = 0.05


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block, and one that Python drops is raised again."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python lets only the main thread handle signals
        return
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_interrupts(sys.unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _redeliver_interrupts(hook):
    """An unraisable-exception hook that sends a dropped KeyboardInterrupt again, and passes anything else to `hook`.

    A signal's exception raised while Python runs a weakref callback or a
    `__del__` (importlib runs one after most imports, and loading a model
    imports hundreds of modules) is printed as "Exception ignored" and
    dropped: the command went on as if Ctrl-C had never been pressed.
    """

    def redeliver(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # A real signal, not `_thread.interrupt_main`: it also cuts short a blocking call such as a sleep.
            threading.Timer(REDELIVERY_DELAY_S, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        else:
            hook(unraisable)

    return redeliver
