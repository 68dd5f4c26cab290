"""How long a process waits for the others at a collective operation, and the one-line error when the wait runs out.

A process that hangs, or falls far behind, would otherwise leave the others
waiting for ever at the next broadcast or gradient reduction. The process
group's timeout ends that wait with an exception in the waiting process
(gloo raises it from the operation; DeepSpeed's process group is created
with the same timeout), which becomes a one-line error here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs

from moram_cli.errors import FollowsAnotherProcess, MoramError

# 30 minutes, torch's own default for gloo. A healthy run has long waits of its own: every process loads
# (downloads, converts) the base model before the first collective after it, and one of them may finish
# minutes behind the others; DeepSpeed's first run compiles its ops. NCCL's default, 10 minutes, can be
# too short for that on a large model.
DEFAULT_COLLECTIVE_TIMEOUT = 1800.0
# About 30 years, for "never give up": timedelta overflows not far above.
MAX_COLLECTIVE_TIMEOUT = 1e9

# gloo raises plain RuntimeErrors: its transport's file names its messages, or the pair it closed after a timeout.
GLOO_MARKS = ("gloo/transport", "pair closure")


def checked_timeout(seconds: float | None) -> float:
    """--collective-timeout, or the default when not given."""
    if seconds is None:
        return DEFAULT_COLLECTIVE_TIMEOUT
    if not 0 < seconds <= MAX_COLLECTIVE_TIMEOUT:
        raise MoramError(f"--collective-timeout {seconds:g}: need a number of seconds above 0 and at most {MAX_COLLECTIVE_TIMEOUT:g}")
    return seconds


def process_group_kwargs(seconds: float) -> InitProcessGroupKwargs:
    """Accelerate's settings for the process group, with a timeout of `seconds`."""
    timeout = timedelta(seconds=seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        # accelerate passes on only what differs from its defaults (600 s), and torch would then give gloo its 1800 s.
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


@contextmanager
def collective_failures(seconds: float) -> Iterator[None]:
    """A collective operation in the block that timed out, or lost the other processes, ends in a one-line error."""
    try:
        yield
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        process = os.environ.get("RANK", "0")
        message = str(err).lower()
        if "pair closure" not in message and ("timed out" in message or "timeout" in message):
            raise MoramError(
                f"process {process} waited {seconds:g} s for the other processes at a collective operation; one of them is "
                "stuck or that far behind: if it was only slow (loading a large model, say), rerun with a larger --collective-timeout"
            ) from None
        raise FollowsAnotherProcess(
            f"process {process} lost the other processes at a collective operation: one of them ended or gave up waiting"
        ) from None


def is_collective_failure(err: RuntimeError) -> bool:
    return isinstance(err, dist.DistError) or any(mark in str(err) for mark in GLOO_MARKS)
