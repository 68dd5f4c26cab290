"""`merge_stores`: the banks of several stores copied into a new one, then optionally pruned on calibration data."""

from __future__ import annotations

from pathlib import Path

from moram_cli.curation.prune import prune_store
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError
from moram_cli.store.merge import copy_banks, plan_merge
from moram_cli.store.store import MemoryStore


def merge_stores(
    out: Path,
    sources: list[Path],
    *,
    tasks: list[str] | None = None,
    prune_below: float | None = None,
    data: Path | None = None,
    eval_data: Path | None = None,
    routing: str | None = None,
    show_progress: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Write a new store at `out` with the banks of `sources` (or those of `tasks`), in source order.

    The store is built in a staging directory next to `out` and renamed into
    place when complete; the sources are only read. `routing` "source" (the
    default for moram stores) makes the merged store answer each sequence with
    one source's banks; "token" lets all ranks compete for every token. With
    `prune_below`, ranks holding less than that share of their module's gate
    mass on `data` are dropped, and `eval_data` is scored before and after.
    """
    plan = plan_merge(sources, tasks, routing)
    calibration, evaluation = _prune_inputs(prune_below, data, eval_data)
    with MemoryStore.building(out, plan.config()) as merged:
        copied = copy_banks(merged, plan)
        # Pruning rewrites banks in place, which is only safe while the store is still in staging.
        pruning = {}
        if prune_below is not None:
            pruning["prune"] = prune_store(merged, prune_below, data, calibration, evaluation, show_progress, trust_remote_code)
    return {"store": str(out)} | copied | pruning


def _prune_inputs(below: float | None, data: Path | None, eval_data: Path | None) -> tuple[list[Example] | None, tuple[Path, list[Example]] | None]:
    """The calibration examples and the (file, examples) to evaluate for --prune-below, read before any work."""
    if below is None:
        if data is not None or eval_data is not None:
            raise MoramError("--data and --eval-data go with --prune-below; to evaluate a merged store run: moram eval OUT --data FILE")
        return None, None
    if not 0 < below < 1:
        raise MoramError(f"--prune-below {below} is out of range; give a share of a module's gate mass between 0 and 1, e.g. 0.01")
    if data is None:
        raise MoramError("--prune-below needs --data: the calibration examples on which each rank's share of gate mass is measured")
    evaluation = (eval_data, read_examples(eval_data, allow_text=False)) if eval_data is not None else None
    return read_examples(data), evaluation
