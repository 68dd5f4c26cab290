"""File modes of a store: what a plain `open()` or `mkdir()` would give, so the umask decides who may read a shared store."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process's umask; reading it means setting it, so it is put straight back."""
    # The briefly set value is the strictest one: anything another thread creates meanwhile stays private rather than open.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` the mode a plain `open()` or `mkdir()` would have given it: 0o666 (files) or 0o777 (folders) less the umask.

    Some writers create private entries whatever the umask: `tempfile.mkdtemp`
    a 0o700 folder, safetensors' `save_file` a 0o600 file (it writes through a
    temporary file). In a store shared by a group, the others could not read them.
    """
    full = 0o777 if stat.S_ISDIR(path.stat().st_mode) else 0o666
    os.chmod(path, full & ~current_umask())
