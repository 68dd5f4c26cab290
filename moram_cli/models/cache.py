"""Where moram keeps converted models and file fingerprints."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$MORAM_CACHE`, else `$XDG_CACHE_HOME/moram`, else `~/.cache/moram`; created on first use."""
    root = os.environ.get("MORAM_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moram"
    path.mkdir(parents=True, exist_ok=True)
    return path
