"""The exception types a user ever sees.

Anything the user can fix (a bad file, a wrong flag, a store that does not
match) is raised as `MoramError`; the CLI prints its message on one line and
exits with code 2. A failed CI gate (`moram eval --min-accuracy ...`) is a
`GateViolation`: one line, exit code 1. Every other exception is a bug and
keeps its traceback.
"""

import json
import os
from pathlib import Path

# Set in processes that `learn-task --launch` started: the folder where a failing process leaves its message.
STATUS_ENV = "MORAM_LAUNCH_STATUS"


class MoramError(Exception):
    """A user-facing failure: `str(err)` is the whole one-line message, fix included."""

    exit_code = 2


class FollowsAnotherProcess(MoramError):
    """A failure that only follows another process's (it ended, or gave up waiting): a launch reports that one instead."""


class GateViolation(Exception):
    """A measured result missed a gate the user set: `str(err)` is the one-line reason."""

    exit_code = 1


def report_failure(message: str, code: int, follows: bool = False) -> bool:
    """In a launched process, leave the failure for the launcher to print once for all; False outside a launch.

    `follows`: this process failed only because another one did, whose report should be the one printed.
    """
    folder = os.environ.get(STATUS_ENV)
    if folder is None:
        return False
    report = {"message": message, "code": code, "follows": follows}
    (Path(folder) / f"process-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report), encoding="utf-8")
    return True
