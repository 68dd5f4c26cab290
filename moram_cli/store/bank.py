"""One bank: the rank-1 experts one task added, as safetensors plus YAML metadata."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moram_cli.data.jsonl import one_line
from moram_cli.errors import MoramError
from moram_cli.models.fingerprint import sha256_file
from moram_cli.store.permissions import follow_umask
from moram_cli.store.yamlio import read_yaml, write_yaml

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bank.yaml"
MISSING_PROTOTYPES = "the bank lacks the task prototypes a task-routed store needs; the bank is corrupt, restore it from a backup"
MISSING_GROUPS = "bank.yaml lacks the routing_groups a source-routed store needs; the bank is corrupt, merge its sources again"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIR_PATTERN = re.compile(r"[0-9]{3,}-" + NAME_PATTERN.pattern)

BankTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]
# Entries `<module>.prototype` beside a bank's keys and values: the mean input of its task's tokens to that module on
# the bare base model, by which a task-routed store recognises the task's inputs (moram_cli.tuner.routing).
PROTOTYPE = "prototype"


def check_task_name(name: str) -> str:
    """Task names become directory names: refuse anything that could escape or confuse the store."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise MoramError(
            f"invalid task name {name[:40]!r}; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def is_bank_dir(path: Path) -> bool:
    """`banks/<NNN>-<name>/`: anything else under `banks/` is not a bank and never loaded."""
    return path.is_dir() and DIR_PATTERN.fullmatch(path.name) is not None


@dataclass(frozen=True)
class Bank:
    """A bank directory `banks/<NNN>-<name>/` of a store."""

    path: Path

    @property
    def index(self) -> int:
        return int(self.path.name.split("-", 1)[0])

    @property
    def name(self) -> str:
        return self.path.name.split("-", 1)[1]

    def metadata(self) -> dict:
        return read_yaml(self.path / META_FILE, "bank metadata")

    def verified_hash(self, weights: Path | None = None) -> str:
        """The recorded weights sha256, once `weights` (default: the bank's own file, or a copy of it) proved to match it."""
        weights = weights or self.path / WEIGHTS_FILE
        recorded = self.metadata().get("weights_sha256")
        if not weights.is_file() or sha256_file(weights) != recorded:
            raise MoramError(f"{self.path}: bank weights are missing or corrupt (sha256 mismatch); restore the bank from a backup or remove it")
        return recorded

    def tensors(self, verify: bool = True) -> BankTensors:
        """Module name -> (A, B), checked against the recorded weights hash."""
        weights = self.path / WEIGHTS_FILE
        if verify:
            self.verified_hash()
        with self._reading():
            flat = load_file(weights)
        return unflatten(flat, self.path)

    def prototypes(self) -> dict[str, torch.Tensor]:
        """Module name -> this bank's task prototype there; empty when none was recorded."""
        with self._reading(), safe_open(self.path / WEIGHTS_FILE, "pt") as weights:
            return {key.rsplit(".", 1)[0]: weights.get_tensor(key) for key in weights.keys() if key.endswith(f".{PROTOTYPE}")}

    def shapes(self) -> dict[str, tuple[list[int], list[int]]]:
        """Module name -> (shape of A, shape of B), read from the safetensors header alone."""
        with self._reading(), safe_open(self.path / WEIGHTS_FILE, "pt") as weights:
            flat = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        return unflatten(flat, self.path)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The bank's weights file is read meanwhile: a failure is a one-line error naming the bank."""
        try:
            yield
        except (SafetensorError, OSError) as exc:
            raise MoramError(f"{self.path}: bank weights cannot be read ({one_line(str(exc), 120)}); restore the bank from a backup") from None


def routing_groups(metadata: dict) -> list[int] | None:
    """The routing groups `moram merge --routing source` recorded for a bank, or None when missing or malformed."""
    groups = metadata.get("routing_groups")
    valid = isinstance(groups, list) and groups and all(isinstance(g, int) and not isinstance(g, bool) for g in groups)
    return groups if valid else None


def stack_banks(per_bank: list[BankTensors]) -> BankTensors:
    """Module name -> (A, B) of several banks stacked along the rank axis, oldest first."""
    if not per_bank:
        return {}
    return {
        module: (torch.cat([t[module][0] for t in per_bank]), torch.cat([t[module][1] for t in per_bank], dim=1))
        for module in per_bank[0]
    }


def flatten(tensors: BankTensors, prototypes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keys `<module>.A` (the keys of the memory), `<module>.B` (its values) and, when given, `<module>.prototype`."""
    flat = {}
    for module, (A, B) in tensors.items():
        flat[f"{module}.A"] = A.contiguous()
        flat[f"{module}.B"] = B.contiguous()
    for module, prototype in (prototypes or {}).items():
        flat[f"{module}.{PROTOTYPE}"] = prototype.contiguous()
    return flat


def unflatten(flat: dict, where: Path) -> dict:
    """Module name -> (its `.A` entry, its `.B` entry): tensors, or their shapes."""
    modules = sorted({key.rsplit(".", 1)[0] for key in flat})
    try:
        return {m: (flat[f"{m}.A"], flat[f"{m}.B"]) for m in modules}
    except KeyError as exc:
        raise MoramError(f"{where}: bank is missing tensor {exc.args[0]}; restore the bank from a backup") from None


def write_bank(directory: Path, tensors: BankTensors, metadata: dict, prototypes: dict[str, torch.Tensor] | None = None) -> None:
    """Write a bank's files into `directory` (a staging directory: the store renames it into place)."""
    directory.mkdir(parents=True)
    weights = directory / WEIGHTS_FILE
    try:
        save_file(flatten(tensors, prototypes), str(weights))
    except SafetensorError as exc:
        # safetensors reports I/O failures (disk full, read-only) as its own error, not as OSError.
        raise OSError(errno.EIO, one_line(str(exc), 160)) from None
    follow_umask(weights)
    _fsync(weights)
    write_yaml(directory / META_FILE, {**metadata, "weights_sha256": sha256_file(weights)})


def copy_bank(source: Bank, directory: Path, metadata: dict) -> None:
    """Copy `source`'s weights byte for byte into `directory` (a staging directory), checked against their recorded hash."""
    directory.mkdir(parents=True)
    weights = directory / WEIGHTS_FILE
    with contextlib.suppress(FileNotFoundError):  # a missing source file is reported as a corrupt bank just below
        shutil.copyfile(source.path / WEIGHTS_FILE, weights)
    digest = source.verified_hash(weights)
    _fsync(weights)
    write_yaml(directory / META_FILE, {**metadata, "weights_sha256": digest})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
