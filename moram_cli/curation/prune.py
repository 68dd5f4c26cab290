"""Dropping the ranks the gate hardly uses on calibration data, module by module."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moram_cli.data.jsonl import Example
from moram_cli.evaluation.evaluate import evaluate_examples
from moram_cli.hashing import sha256_file
from moram_cli.inspection.gates import check_gated, collect_gates
from moram_cli.models.memory import build_memory_model, rank_counts, stack_banks
from moram_cli.store.bank import write_bank
from moram_cli.store.store import MemoryStore


def kept_ranks(mass: torch.Tensor, below: float) -> torch.Tensor:
    """Mask of the ranks holding at least `below` of the module's gate mass.

    The module's busiest rank always stays, so no module loses its memory;
    a module whose gate never fired on the data keeps every rank (no evidence).
    """
    total = mass.sum()
    if total == 0:
        return torch.ones_like(mass, dtype=torch.bool)
    keep = mass / total >= below
    keep[mass.argmax()] = True
    return keep


def prune_store(
    store: MemoryStore, below: float, data: Path, examples: list[Example], evaluation: tuple[Path, list[Example]] | None,
    show_progress: bool = False, trust_remote_code: bool = False,
) -> dict:
    """Prune the banks of `store` in place by their share of gate mass on `examples` (read from `data`).

    Rewrites banks file by file, so it must only run on a store still in its
    staging directory (as `merge` does). With `evaluation` (a data file and
    its examples) the accuracy is measured before and after.
    """
    check_gated(store)
    model, tokenizer = build_memory_model(store, trust_remote_code=trust_remote_code)
    settings = store.config.training
    before = _accuracy(model, tokenizer, evaluation, settings.max_length, show_progress)
    stats = collect_gates(model, tokenizer, examples, settings.batch_size, settings.max_length)
    note = {"below": below, "data": str(data), "data_sha256": sha256_file(data)}
    dropped = _drop_ranks(store, {module: kept_ranks(totals.mass, below) for module, totals in stats.items()}, note)
    pruned = [bank.tensors() for bank in store.banks()]
    model.set_memory(stack_banks(pruned), rank_counts(pruned))
    result = {"below": below, "data": str(data), "ranks_before": sum(s.mass.numel() for s in stats.values()),
              "ranks_dropped": sum(dropped.values()), "dropped_per_bank": dropped}
    if evaluation is not None:
        after = _accuracy(model, tokenizer, evaluation, settings.max_length, show_progress)
        result["eval"] = {"data": str(evaluation[0]), "scoring": after["scoring"], "total": after["total"],
                          "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                          "change": after["accuracy"] - before["accuracy"]}
    return result


def _accuracy(model, tokenizer, evaluation: tuple[Path, list[Example]] | None, max_length: int, show_progress: bool) -> dict | None:
    if evaluation is None:
        return None
    data, examples = evaluation
    return evaluate_examples(model, tokenizer, examples, data, max_length=max_length, show_progress=show_progress)


def _drop_ranks(store: MemoryStore, keep: dict[str, torch.Tensor], note: dict) -> dict[str, int]:
    """Rewrite every bank that loses ranks under the per-module masks `keep` (all banks stacked, oldest first)."""
    banks = store.banks()
    per_bank = [bank.tensors() for bank in banks]
    masks = {module: mask.split([t[module][0].shape[0] for t in per_bank]) for module, mask in keep.items()}
    dropped = {}
    for i, (bank, tensors) in enumerate(zip(banks, per_bank)):
        kept = {module: (A[masks[module][i]], B[:, masks[module][i]]) for module, (A, B) in tensors.items()}
        before, after = (sum(A.shape[0] for A, _ in t.values()) for t in (tensors, kept))
        dropped[bank.path.name] = before - after
        if after < before:
            metadata, extras = bank.metadata(), bank.extras()
            metadata["pruned"] = {**note, "ranks_before": before, "ranks_after": after, "weights_sha256_before": metadata["weights_sha256"]}
            shutil.rmtree(bank.path)
            write_bank(bank.path, kept, metadata, extras)
    return dropped
