"""`MemoryStore`: create, open and grow a store atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from moram_cli.errors import MoramError
from moram_cli.store.bank import Bank, BankTensors, Extras, check_task_name, copy_bank, is_bank_dir, write_bank
from moram_cli.store.config import CONFIG_FILE, StoreConfig
from moram_cli.store.permissions import follow_umask

if TYPE_CHECKING:
    import torch

BANKS_DIR = "banks"
STAGING_DIR = ".staging"
# `.staging/resume-<task>/`: an interrupted learn-task's progress, kept until its bank is written.
RESUME_PREFIX = "resume-"


class MemoryStore:
    """A store directory: `store.yaml`, `banks/<NNN>-<name>/`, and a private `.staging/` area.

    Every change is built under `.staging/` and renamed into place, so a
    crash at any instant leaves either the old or the new store, never a
    partial one.
    """

    def __init__(self, path: Path, config: StoreConfig) -> None:
        self.path = path
        self.config = config

    @classmethod
    def create(cls, path: Path, config: StoreConfig) -> "MemoryStore":
        """Write a new, empty store at `path` (which must not exist, or be an empty directory)."""
        with cls.building(path, config):
            pass
        return cls(path, config)

    @classmethod
    @contextmanager
    def building(cls, path: Path, config: StoreConfig) -> Iterator["MemoryStore"]:
        """A new store filled inside the `with` block in a staging directory next to `path`.

        It is renamed to `path` only when the block completes; an error or
        Ctrl-C inside it leaves no trace.
        """
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise MoramError(f"{path}: already exists and is not empty; choose a new store directory or remove it first")
        if not path.parent.is_dir():
            raise MoramError(f"{path.parent}: parent directory does not exist; create it first")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
        except OSError as exc:
            raise MoramError(f"{path}: cannot create the store ({exc.strerror}); check permissions and free space") from None
        try:
            (staging / BANKS_DIR).mkdir()
            config.save(staging)
            yield cls(staging, config)
            follow_umask(staging)  # mkdtemp made it private
            os.replace(staging, path)
        except OSError as exc:
            raise MoramError(f"{path}: cannot create the store ({exc.strerror}); check permissions and free space") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def open(cls, path: Path) -> "MemoryStore":
        if not (path / CONFIG_FILE).is_file():
            raise MoramError(f"{path}: not a moram store (no {CONFIG_FILE}); create one with: moram init {path}")
        return cls(path, StoreConfig.load(path))

    def banks(self) -> list[Bank]:
        """The banks in learning order."""
        directory = self.path / BANKS_DIR
        banks = [Bank(p) for p in directory.iterdir() if is_bank_dir(p)] if directory.is_dir() else []
        return sorted(banks, key=lambda bank: (bank.index, bank.name))

    def check_new_task(self, name: str) -> None:
        """Refuse a task name that is unsafe or already used, before any work is done."""
        check_task_name(name)
        if any(b.name == name for b in self.banks()):
            raise MoramError(f"{self.path}: a task named {name!r} is already in the store; pick another --name")

    def add_bank(self, name: str, tensors: BankTensors, metadata: dict, extras: Extras | None = None) -> Bank:
        """Append a bank (with its `extras`, such as its task's prototypes, if any) atomically: written in staging, then renamed to `banks/<NNN>-<name>`."""
        return self._append(name, lambda directory, index: write_bank(directory, tensors, {"index": index, "task": name, **metadata}, extras))

    def copy_bank(self, source: Bank, name: str, metadata: dict) -> Bank:
        """Append a copy of another store's bank under `name`: its weights byte for byte, checked against their hash."""
        return self._append(name, lambda directory, index: copy_bank(source, directory, {**metadata, "index": index, "task": name}))

    def _append(self, name: str, write: Callable[[Path, int], None]) -> Bank:
        """Run `write(directory, index)` on a fresh staging directory, then rename it to the next bank."""
        self.check_new_task(name)
        banks = self.banks()
        final = self.path / BANKS_DIR / f"{len(banks) + 1:03d}-{name}"
        staging = self.path / STAGING_DIR / f"bank-{uuid.uuid4().hex}"
        try:
            write(staging, len(banks) + 1)
            os.replace(staging, final)
        except OSError as exc:
            raise MoramError(f"{self.path}: cannot write the new bank ({exc.strerror}); check permissions and free space; the store is unchanged") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Bank(final)
