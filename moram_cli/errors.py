"""The exception types a user ever sees.

Anything the user can fix (a bad file, a wrong flag, a store that does not
match) is raised as `MoramError`; the CLI prints its message on one line and
exits with code 2. A failed CI gate (`moram eval --min-accuracy ...`) is a
`GateViolation`: one line, exit code 1. Every other exception is a bug and
keeps its traceback.
"""


class MoramError(Exception):
    """A user-facing failure: `str(err)` is the whole one-line message, fix included."""

    exit_code = 2


class GateViolation(Exception):
    """A measured result missed a gate the user set: `str(err)` is the one-line reason."""

    exit_code = 1
