"""`store_lock`: one writer at a time per store, and a message that says who the writer is.

The lock is a file, `<store>/.lock`, created with O_CREAT|O_EXCL (atomic on
local filesystems and NFSv3+) and holding the pid, host, start time and
command of its holder. Readers (`eval`, `verify`) take no lock: every write
is a rename, so they never see half a store.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import yaml

from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line

LOCK_FILE = ".lock"


@contextmanager
def store_lock(store_path: Path, command: str, break_lock: bool = False) -> Iterator[None]:
    """Hold the store's writer lock around the body; a second writer gets a one-line MoramError.

    The lock goes on the way out, Ctrl-C included. Only a hard kill or a
    crash of the machine leaves it behind; `break_lock` then clears it, but
    never one whose process still runs on this machine.
    """
    lock = store_path / LOCK_FILE
    if break_lock:
        _break(lock)
    mine = _acquire(lock, command)
    try:
        yield
    finally:
        # Someone may have broken a lock they thought stale and taken their own: leave theirs.
        if _holder(lock) == mine:
            lock.unlink(missing_ok=True)


def lock_message(store_path: Path) -> str | None:
    """What a writer arriving now would be told about the store's lock, or None when it is free."""
    lock = store_path / LOCK_FILE
    if not lock.exists():
        return None
    holder = _holder(lock)
    if holder is None:
        return f"{store_path}: store is locked ({lock} is unreadable); if no moram command is writing to it, rerun with --break-lock"
    # one_line: the file is plain text anyone with write access could fill with newlines or escapes.
    who = one_line(f"pid {holder['pid']} on {holder['host']} since {holder['since']} ({holder['command']})", 200)
    if _process_gone(holder):
        return f"{store_path}: lock by {who} is stale (the process is gone); rerun with --break-lock to clear it"
    if holder["host"] != socket.gethostname():
        return f"{store_path}: store is locked by {who}; wait for it to finish, or rerun with --break-lock if that process is gone"
    return f"{store_path}: store is locked by {who}; wait for it to finish"


def stale_lock(store_path: Path) -> bool:
    """True when the lock's holder ran on this machine and is gone, so clearing the lock can hurt no one."""
    holder = _holder(store_path / LOCK_FILE)
    return holder is not None and _process_gone(holder)


def _acquire(lock: Path, command: str) -> dict:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command}
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise MoramError(lock_message(lock.parent) or f"{lock.parent}: store lock is changing hands; try again") from None
    except OSError as exc:
        raise MoramError(f"{lock.parent}: cannot lock the store for writing ({exc.strerror}); check permissions and free space") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(holder, fh, sort_keys=False)
    except OSError as exc:
        lock.unlink(missing_ok=True)
        raise MoramError(f"{lock.parent}: cannot lock the store for writing ({exc.strerror}); check free space") from None
    return holder


def _holder(lock: Path) -> dict | None:
    """The lock file's record, or None when it is gone or not a record (e.g. cut short by a crash)."""
    try:
        holder = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    # pid 0 or -1 would make os.kill probe a whole process group and call the lock alive forever.
    fields_ok = isinstance(holder, dict) and type(holder.get("pid")) is int and holder["pid"] > 0 \
        and {"host", "since", "command"} <= set(holder)
    return holder if fields_ok else None


def _process_gone(holder: dict) -> bool:
    """True only when the holder ran on this machine and its pid is free; another host's process cannot be checked."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid, so nothing runs under it
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _break(lock: Path) -> None:
    holder = _holder(lock)
    if holder is not None and holder["host"] == socket.gethostname() and not _process_gone(holder):
        raise MoramError(f"{lock_message(lock.parent)}; --break-lock never breaks the lock of a running process")
    try:
        lock.unlink(missing_ok=True)
    except OSError as exc:
        raise MoramError(f"{lock}: cannot remove the lock ({exc.strerror}); remove it by hand") from None
    if holder is not None:
        who = one_line(f"pid {holder['pid']} on {holder['host']} since {holder['since']}", 200)
        print(f"--break-lock: removed the lock of {who}", file=sys.stderr)
