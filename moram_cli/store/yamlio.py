"""Safe YAML reading and atomic writing (never pickle, never half a file)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from moram_cli.errors import MoramError


def read_yaml(path: Path, what: str, fix: str = "restore it from a backup") -> dict:
    """A YAML mapping, or a one-line MoramError saying `what` is missing or corrupt, and `fix`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoramError(f"{path}: {what} is missing; {fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split())[:120]
        raise MoramError(f"{path}: {what} is corrupt ({problem}); {fix}") from None
    if not isinstance(data, dict):
        raise MoramError(f"{path}: {what} is corrupt (not a YAML mapping); {fix}")
    return data


def write_yaml(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, fsync-ed, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
