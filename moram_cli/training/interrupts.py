"""Ctrl-C and SIGTERM during training: finish the step, save the resume data, then stop."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM; a second one stops at once, as Ctrl-C always did."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch Ctrl-C and SIGTERM (what schedulers and `accelerate launch` send) inside the block."""
    request = StopRequest()
    # Python lets only the main thread handle signals; elsewhere (a library caller's thread) nothing is caught.
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, request.handle) for sig in signals}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
