"""Merging stores, the persistence half: which banks to copy under which names, and copying them with their provenance.

Pruning the merged store on calibration data needs its model, so `moram_cli.curation.merge` does that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from moram_cli import __version__
from moram_cli.errors import MoramError
from moram_cli.store.bank import Bank
from moram_cli.store.config import StoreConfig
from moram_cli.store.store import MemoryStore

# What every source must share with the first: the model the banks plug into and the gate that mixes them.
# r (only sizes future tasks), threshold, dropout, dtype and training defaults may differ; the first source's win.
MUST_MATCH = {
    "base-model fingerprint": lambda c: c.base_model.fingerprint,
    "target modules": lambda c: sorted(c.adapter.target_modules) if isinstance(c.adapter.target_modules, list) else c.adapter.target_modules,
    "gate budget k": lambda c: c.adapter.k,
    "gate temperature": lambda c: c.adapter.temperature,
    "method": lambda c: c.method,
}

# A bank to copy, its name in the merged store, and the routing groups it joins (ids in order of first appearance;
# None when the merged store routes by token).
Planned = tuple[MemoryStore, Bank, str, list[int] | None]


@dataclass(frozen=True)
class MergePlan:
    """What a merge copies, read and checked before anything is written."""

    stores: list[MemoryStore]
    routing: str
    banks: list[Planned]
    duplicates: int

    def config(self) -> StoreConfig:
        """The merged store's settings: the first source's, with the merge's routing."""
        first = self.stores[0].config
        return replace(first, adapter=replace(first.adapter, routing=self.routing), tool_version=__version__,
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def plan_merge(sources: list[Path], tasks: list[str] | None, routing: str | None) -> MergePlan:
    """The banks of `sources` (or those of `tasks`) to merge, in source order; refuses stores that do not fit together.

    `routing` defaults to "source" for moram stores and "token" for the baselines.
    """
    stores = [MemoryStore.open(path) for path in sources]
    weighted = next((store for store in stores if store.config.adapter.gate_scope == "weighted"), None)
    if weighted is not None:
        raise MoramError(f"{weighted.path}: its banks weigh the banks before them in their own store (gate scope weighted), "
                         "which a merged store does not keep; merge stores of another gate scope")
    for other in stores[1:]:
        check_mergeable(stores[0], other)
    routing = _routing(routing, stores[0].config.method)
    banks, duplicates = _banks_to_copy(stores, tasks)
    if routing == "token":
        banks = [(store, bank, name, None) for store, bank, name, _ in banks]
    return MergePlan(stores, routing, banks, duplicates)


def copy_banks(merged: MemoryStore, plan: MergePlan) -> dict:
    """Copy the planned banks into `merged`, each with its provenance; returns what was merged, for the report."""
    copies = [(bank, _copy(merged, store, bank, name, groups)) for store, bank, name, groups in plan.banks]
    _check_shapes(copies)
    return {
        "sources": [str(s.path.resolve()) for s in plan.stores], "deduplicated": plan.duplicates, "routing": plan.routing,
        "banks": [{"bank": copy.path.name, "task": copy.name, "from": str(bank.path.resolve()), "routing_groups": groups}
                  for (bank, copy), (*_, groups) in zip(copies, plan.banks)],
    }


def check_mergeable(first: MemoryStore, other: MemoryStore) -> None:
    for what, value in MUST_MATCH.items():
        if value(other.config) != value(first.config):
            raise MoramError(
                f"{other.path}: {what} {value(other.config)} differs from {value(first.config)} in {first.path}; "
                "only stores on the same base model with the same target modules, k, temperature and method can be merged"
            )


def _banks_to_copy(stores: list[MemoryStore], tasks: list[str] | None) -> tuple[list[Planned], int]:
    """The banks to copy, each with its name in the merged store and routing groups, and how many were left out as duplicates.

    A bank whose weights hash equals an earlier one's is stored once, in the
    routing groups of both. A task name already taken by a bank with other
    weights gets the first free suffix: `name-2`, `name-3`, ...
    """
    picked = _picked(stores, tasks)
    if not picked:
        raise MoramError(f"{stores[0].path}: the source stores hold no banks; there is nothing to merge")
    seen, names, ids = {}, set(), {}
    for store, bank in picked:
        metadata = bank.metadata()
        groups = [ids.setdefault(key, len(ids)) for key in _group_keys(stores.index(store), store, metadata)]
        digest = metadata.get("weights_sha256")
        if digest in seen:
            seen[digest][3].extend(g for g in groups if g not in seen[digest][3])
        else:
            names.add(name := free_name(bank.name, names))
            seen[digest] = (store, bank, name, groups)
    plan = list(seen.values())
    return plan, len(picked) - len(plan)


def _group_keys(position: int, store: MemoryStore, metadata: dict) -> list[tuple]:
    """A source's banks were trained together, so they answer as one group; a source-routed source keeps its own groups."""
    if store.config.adapter.routing == "source":
        return [(position, inner) for inner in metadata.get("routing_groups") or [None]]
    return [(position, None)]


def free_name(name: str, taken: set[str]) -> str:
    """`name`, or the first of `name-2`, `name-3`, ... not in `taken` (cut to stay within 64 characters)."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        suffix = f"-{number}"
        candidate = name[: 64 - len(suffix)] + suffix
    return candidate


# A merged store's banks come from separate sequences, so they form no prefix a task could be routed to.
MERGE_ROUTINGS = ("token", "source")


def _routing(asked: str | None, method: str) -> str:
    """Source routing picks banks by their experts' gate scores, so it needs moram's gate; it is moram's default."""
    if asked is None:
        return "source" if method == "moram" else "token"
    if asked not in MERGE_ROUTINGS:
        raise MoramError(f"--routing {asked!r} is unknown; use one of {', '.join(MERGE_ROUTINGS)}")
    if asked == "source" and method != "moram":
        raise MoramError(f"--routing source needs moram stores: the {method} method has no gate to pick a source with; use --routing token")
    return asked


def _picked(stores: list[MemoryStore], tasks: list[str] | None) -> list[tuple[MemoryStore, Bank]]:
    banks = [(store, bank) for store in stores for bank in store.banks()]
    if tasks is None:
        return banks
    available = sorted({bank.name for _, bank in banks})
    unknown = [task for task in tasks if task not in available]
    if unknown:
        raise MoramError(f"--tasks: no bank of task {unknown[0]!r} in the source stores; available: {', '.join(available) or 'none'}")
    return [(store, bank) for store, bank in banks if bank.name in tasks]


def _copy(merged: MemoryStore, store: MemoryStore, bank: Bank, name: str, groups: list[int] | None) -> Bank:
    provenance = {"store": str(store.path.resolve()), "index": bank.index, "name": bank.name}
    metadata = {key: value for key, value in bank.metadata().items() if key != "routing_groups"}
    return merged.copy_bank(bank, name, {**metadata, "merged_from": provenance} | ({"routing_groups": groups} if groups is not None else {}))


def _check_shapes(copies: list[tuple[Bank, Bank]]) -> None:
    """Every bank must adapt the same modules with the same input and output sizes; rank counts may differ."""
    sizes = [(source, {module: (A[1], B[0]) for module, (A, B) in copy.shapes().items()}) for source, copy in copies]
    first, reference = sizes[0]
    for source, found in sizes[1:]:
        if found != reference:
            odd = next(m for m in sorted(found.keys() | reference.keys()) if found.get(m) != reference.get(m))
            raise MoramError(
                f"{source.path}: module {odd} has (in, out) sizes {found.get(odd)}, but {reference.get(odd)} in {first.path}; "
                "the bank was made for another base model and cannot be merged"
            )
