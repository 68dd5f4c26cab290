"""One bank: the rank-1 experts one task added, as safetensors plus YAML metadata."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from moram_cli.errors import MoramError
from moram_cli.hashing import sha256_file
from moram_cli.safe_text import one_line
from moram_cli.store.permissions import follow_umask
from moram_cli.store.yamlio import read_yaml, write_yaml

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bank.yaml"
MISSING_PROTOTYPES = "the bank lacks the task prototypes a task-routed store needs; the bank is corrupt, restore it from a backup"
MISSING_GAINS = "the bank lacks the earlier-bank gains a store with gate scope weighted needs; the bank is corrupt, restore it from a backup"
MISSING_GROUPS = "bank.yaml lacks the routing_groups a source-routed store needs; the bank is corrupt, merge its sources again"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIR_PATTERN = re.compile(r"[0-9]{3,}-" + NAME_PATTERN.pattern)

# torch loads only where a bank meets a model: `verify`, `inspect-ranks` and `eval --suite cl` read banks through numpy or
# not at all, and start in a fraction of the seconds torch takes to import.
if TYPE_CHECKING:
    import numpy as np
    import torch

BankTensors = dict[str, tuple["torch.Tensor", "torch.Tensor"]]
BankArrays = dict[str, tuple["np.ndarray", "np.ndarray"]]
# The safetensors dtypes numpy holds; it lacks bfloat16 and the float8 formats (moram writes its banks in float32).
NUMPY_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"})
# Entries `<module>.<suffix>` beside a bank's keys and values (its "extras"). `prototype`: the mean input of its task's
# tokens to that module on the bare base model, by which a task-routed store recognises the task's inputs
# (moram_cli.tuner.routing). `gains`: under gate scope weighted, the weight of each earlier bank's output in this task's
# answers there (moram_cli.tuner.layer).
PROTOTYPE = "prototype"
GAINS = "gains"
EXTRAS = (PROTOTYPE, GAINS)
Extras = dict[str, dict[str, "torch.Tensor"]]


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
        """Module name -> (A, B) as torch tensors, checked against the recorded weights hash."""
        if verify:
            self.verified_hash()
        return unflatten(self._entries("pt"), self.path)

    def arrays(self, verify: bool = True) -> BankArrays:
        """`tensors()` as numpy arrays, for the commands that read banks without a model (verify, inspect-ranks).

        An entry in a dtype numpy lacks is read through torch and widened to float32.
        """
        if verify:
            self.verified_hash()
        foreign = {key for key, (dtype, _) in self._header().items() if dtype not in NUMPY_DTYPES}
        flat = self._entries("numpy", lambda key: key not in foreign)
        if foreign:
            flat |= {key: tensor.float().numpy() for key, tensor in self._entries("pt", foreign.__contains__).items()}
        return unflatten(flat, self.path)

    def extras(self) -> Extras:
        """Suffix -> module name -> this bank's entry `<module>.<suffix>`, for every suffix of EXTRAS it recorded."""
        found: Extras = {}
        for key, tensor in self._entries("pt", lambda key: extra_suffix(key) is not None).items():
            module, suffix = key.rsplit(".", 1)
            found.setdefault(suffix, {})[module] = tensor
        return found

    def prototypes(self) -> dict[str, torch.Tensor]:
        """Module name -> this bank's task prototype there; empty when none was recorded."""
        return self.extras().get(PROTOTYPE, {})

    def has_extra(self, suffix: str) -> bool:
        """Whether the bank recorded entries `<module>.<suffix>`, read from the safetensors header alone."""
        return any(extra_suffix(key) == suffix for key in self._header())

    def shapes(self) -> dict[str, tuple[list[int], list[int]]]:
        """Module name -> (shape of A, shape of B), read from the safetensors header alone."""
        return unflatten({key: shape for key, (_, shape) in self._header().items()}, self.path)

    def _entries(self, framework: str, keep: Callable[[str], bool] = lambda key: True) -> dict:
        """The weights file's entries whose keys `keep` accepts, as `framework` ("pt" or "numpy") tensors."""
        with self._reading(), safe_open(self.path / WEIGHTS_FILE, framework) as weights:
            return {key: weights.get_tensor(key) for key in weights.keys() if keep(key)}

    def _header(self) -> dict[str, tuple[str, list[int]]]:
        """Key -> (dtype, shape) of every entry of the weights file, from its header; numpy, not torch, opens it."""
        with self._reading(), safe_open(self.path / WEIGHTS_FILE, "numpy") as weights:
            entries = {key: weights.get_slice(key) for key in weights.keys()}
            return {key: (entry.get_dtype(), entry.get_shape()) for key, entry in entries.items()}

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The bank's weights file is read meanwhile: a failure is a one-line error naming the bank."""
        try:
            yield
        except (SafetensorError, OSError) as exc:
            raise MoramError(f"{self.path}: bank weights cannot be read ({one_line(str(exc), 120)}); restore the bank from a backup") from None


def extra_suffix(key: str) -> str | None:
    """The EXTRAS suffix of a weights-file key, None for a key of the ranks themselves."""
    suffix = key.rsplit(".", 1)[-1]
    return suffix if suffix in EXTRAS else None


def routing_groups(metadata: dict) -> list[int] | None:
    """The routing groups `moram merge --routing source` recorded for a bank, or None when missing or malformed."""
    groups = metadata.get("routing_groups")
    valid = isinstance(groups, list) and groups and all(isinstance(g, int) and not isinstance(g, bool) for g in groups)
    return groups if valid else None


def flatten(tensors: BankTensors, extras: Extras | None = None) -> dict[str, torch.Tensor]:
    """Keys `<module>.A` (the keys of the memory), `<module>.B` (its values) and `<module>.<suffix>` for the extras given."""
    flat = {}
    for module, (A, B) in tensors.items():
        flat[f"{module}.A"] = A.contiguous()
        flat[f"{module}.B"] = B.contiguous()
    for suffix, per_module in (extras or {}).items():
        for module, tensor in per_module.items():
            flat[f"{module}.{suffix}"] = tensor.contiguous()
    return flat


def unflatten(flat: dict, where: Path) -> dict:
    """Module name -> (its `.A` entry, its `.B` entry): tensors, or their shapes."""
    modules = sorted({key.rsplit(".", 1)[0] for key in flat})
    try:
        return {m: (flat[f"{m}.A"], flat[f"{m}.B"]) for m in modules}
    except KeyError as exc:
        raise MoramError(f"{where}: bank is missing tensor {exc.args[0]}; restore the bank from a backup") from None


def write_bank(directory: Path, tensors: BankTensors, metadata: dict, extras: Extras | None = None) -> None:
    """Write a bank's files into `directory` (a staging directory: the store renames it into place)."""
    from safetensors.torch import save_file  # the tensors come from a model, which loaded torch already

    directory.mkdir(parents=True)
    weights = directory / WEIGHTS_FILE
    try:
        save_file(flatten(tensors, extras), str(weights))
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
