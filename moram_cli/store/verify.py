"""`verify_store`: check every file of a store without loading a model.

numpy reads the weights, so `moram verify` never waits seconds for torch to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line
from moram_cli.store.bank import (
    GAINS, META_FILE, MISSING_GAINS, MISSING_GROUPS, MISSING_PROTOTYPES, PROTOTYPE, Bank, BankArrays, is_bank_dir, routing_groups,
)
from moram_cli.store.config import AdapterSettings
from moram_cli.store.lock import lock_message
from moram_cli.store.store import BANKS_DIR, RESUME_PREFIX, STAGING_DIR, MemoryStore

RESTORE = "restore the bank from a backup"
FOREIGN = "it was made for another model or store: remove it"


@dataclass
class BankReport:
    """What `verify_store` found in one entry of `banks/`; `dims` (module -> (d_in, d_out)) only when its tensors are sound."""

    path: Path
    problems: list[str] = field(default_factory=list)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)
    task: object = None
    experts: int | None = None

    def row(self) -> dict:
        return {"bank": self.path.name, "task": self.task, "experts": self.experts, "modules": len(self.dims) or None,
                "ok": not self.problems, "problems": self.problems}


def verify_store(store_path: Path) -> dict:
    """Check the store's config and every bank: files, weights hash, safetensors, shapes, metadata, numbering.

    A missing, corrupt or newer-format `store.yaml` raises MoramError at once;
    then every bank is checked and every problem listed, each one line naming
    the bank and the fix. Leftovers of interrupted writes and a lock are
    warnings. Returns the report that `--json` prints.
    """
    store = MemoryStore.open(store_path)
    banks = [_check_bank(bank, position, store.config.adapter) for position, bank in enumerate(store.banks(), start=1)]
    _check_alike(banks)
    reports = banks + _strays(store.path / BANKS_DIR)
    problems = [problem for report in reports for problem in report.problems]
    return {"store": str(store_path), "format_version": store.config.format_version, "ok": not problems,
            "banks": [report.row() for report in reports], "problems": problems, "warnings": _warnings(store.path)}


def require_healthy(report: dict) -> dict:
    """A `verify_store` report without problems, unchanged; else its first problem as the one-line error."""
    problems = report["problems"]
    if problems:
        more = f" (+{len(problems) - 1} more: moram verify --json lists them all)" if len(problems) > 1 else ""
        raise MoramError(problems[0] + more)
    return report


def _check_bank(bank: Bank, position: int, adapter: AdapterSettings) -> BankReport:
    report = BankReport(bank.path)
    if bank.index != position:
        report.problems.append(
            f"{bank.path}: numbered {bank.index:03d} where bank {position:03d} should be (a bank is missing or numbered twice); "
            "restore the missing bank from a backup"
        )
    metadata = _check_metadata(bank, report, adapter.routing == "source")
    try:
        # Without a recorded hash there is nothing to compare; the metadata check has said so already.
        arrays = bank.arrays(verify=metadata is not None and "weights_sha256" in metadata)
    except MoramError as err:
        report.problems.append(str(err))
        return report
    _check_arrays(bank, arrays, report)
    if adapter.routing == "task" and not bank.has_extra(PROTOTYPE):
        report.problems.append(f"{bank.path}: {MISSING_PROTOTYPES}")
    if adapter.gate_scope == "weighted" and position > 1 and not bank.has_extra(GAINS):
        report.problems.append(f"{bank.path}: {MISSING_GAINS}")
    return report


def _check_metadata(bank: Bank, report: BankReport, routed: bool) -> dict | None:
    try:
        metadata = bank.metadata()
    except MoramError as err:
        report.problems.append(str(err))
        return None
    report.task = metadata.get("task")
    where = bank.path / META_FILE
    for key, expected in (("task", bank.name), ("index", bank.index)):
        if metadata.get(key) != expected:
            found = one_line(repr(metadata[key])) if key in metadata else "missing"
            report.problems.append(f"{where}: {key} is {found} but the directory says {expected!r}; {RESTORE}")
    if "weights_sha256" not in metadata:
        report.problems.append(f"{where}: weights_sha256 is missing, so the weights cannot be checked; {RESTORE}")
    if routed and routing_groups(metadata) is None:
        report.problems.append(f"{bank.path}: {MISSING_GROUPS}")
    return metadata


def _check_arrays(bank: Bank, arrays: BankArrays, report: BankReport) -> None:
    """A(r, d_in) and B(d_out, r) per module, finite floats; r may differ between modules (pruning) and be 0."""
    problems = len(report.problems)
    for module, (A, B) in arrays.items():
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            report.problems.append(f"{bank.path}: {module} has shapes A{tuple(A.shape)} B{tuple(B.shape)}, not A(r, d_in) B(d_out, r); {RESTORE}")
        elif not (_floating(A) and _floating(B) and np.isfinite(A).all() and np.isfinite(B).all()):
            report.problems.append(f"{bank.path}: {module} holds values that are not finite numbers; {RESTORE}, or remove it and learn the task again")
    if len(report.problems) == problems:
        report.dims = {module: (A.shape[1], B.shape[0]) for module, (A, B) in arrays.items()}
        report.experts = sum(A.shape[0] for A, _ in arrays.values())


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _check_alike(reports: list[BankReport]) -> None:
    """Every bank must adapt the modules of the first sound one, with the same dimensions."""
    sound = [report for report in reports if report.dims]
    for report in sound[1:]:
        first = sound[0]
        odd = sorted(set(report.dims) ^ set(first.dims))
        if odd:
            report.problems.append(f"{report.path}: adapts other modules than {first.path.name} (e.g. {odd[0]}); {FOREIGN}")
            continue
        module = next((m for m in report.dims if report.dims[m] != first.dims[m]), None)
        if module is not None:
            (d_in, d_out), (was_in, was_out) = report.dims[module], first.dims[module]
            report.problems.append(
                f"{report.path}: {module} maps {d_in} -> {d_out} features but in {first.path.name} {was_in} -> {was_out}; {FOREIGN}"
            )


def _strays(directory: Path) -> list[BankReport]:
    """Entries of `banks/` that no load reads, where a renamed or damaged bank would hide."""
    entries = sorted(p for p in directory.iterdir() if not is_bank_dir(p)) if directory.is_dir() else []
    return [BankReport(p, [f"{p}: not a bank (bank directories are named NNN-task), so moram ignores it; rename or remove it"])
            for p in entries]


def _warnings(store_path: Path) -> list[str]:
    staging = store_path / STAGING_DIR
    leftovers = sorted(staging.iterdir()) if staging.is_dir() else []
    notes = [f"{p}: resume data of an interrupted learn-task of task {p.name.removeprefix(RESUME_PREFIX)!r}; "
             "continue it with learn-task --resume, or delete it" if p.name.startswith(RESUME_PREFIX)
             else f"{p}: left over from an interrupted write; delete it when no learn-task is running" for p in leftovers]
    locked = lock_message(store_path)
    return notes + ([locked] if locked else [])
