"""Safe YAML reading and atomic writing (never pickle, never half a file)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line


def read_yaml(path: Path, what: str, fix: str = "restore it from a backup") -> dict:
    """A YAML mapping, or a one-line MoramError saying `what` is missing or corrupt, and `fix`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoramError(f"{path}: {what} is missing; {fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MoramError(f"{path}: {what} is corrupt ({yaml_problem(exc)}); {fix}") from None
    if not isinstance(data, dict):
        raise MoramError(f"{path}: {what} is corrupt (not a YAML mapping); {fix}")
    return data


def yaml_problem(exc: Exception) -> str:
    """Where the YAML went wrong and what was found there, e.g. `line 2, column 4: mapping values are not allowed here`.

    `str(exc)` first quotes the enclosing block, so cut to one short line it
    lost the problem and its position, the part that says what to fix.
    """
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return one_line(str(exc), 160)
    context = f", {exc.context}" if exc.context else ""
    context += f" from line {exc.context_mark.line + 1}" if context and exc.context_mark else ""
    return one_line(f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}", 160)


def write_yaml(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, fsync-ed, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
