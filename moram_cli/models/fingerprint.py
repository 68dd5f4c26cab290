"""Content fingerprints of model files, memoised so a multi-GB model is hashed once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moram_cli.hashing import sha256_file
from moram_cli.models.cache import cache_dir


def _memo_path() -> Path:
    return cache_dir() / "fingerprints.json"


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def cached_sha256(path: Path) -> str:
    """`sha256_file`, skipped when the file's path, size and mtime are unchanged since last time."""
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = _memo_key(path)
    if key not in memo:
        memo[key] = sha256_file(path)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=0))
        os.replace(tmp, memo_file)
    return memo[key]


def directory_fingerprint(directory: Path) -> str:
    """sha256 over the names and content hashes of a model directory's top-level files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}\0{cached_sha256(path)}\n".encode())
    return digest.hexdigest()
