"""What a store's banks hold, read from the weights alone: ranks, parameters, key and value norms.

numpy does the arithmetic: with no model to run, `inspect-ranks` without --data never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from moram_cli.store import Bank, MemoryStore

# A rank whose value column has an L2 norm at most this adds nothing visible to any output;
# a rank that never received a gradient has exactly 0.
DEAD_VALUE_NORM = 1e-6


def norm_summary(norms: np.ndarray) -> dict:
    if norms.size == 0:
        return {"min": 0.0, "mean": 0.0, "max": 0.0}
    return {"min": norms.min().item(), "mean": norms.mean().item(), "max": norms.max().item()}


def module_summary(key_norms: np.ndarray, value_norms: np.ndarray, parameters: int) -> dict:
    """Ranks, parameters, norm summaries and dead ranks (by their index) of some ranks."""
    dead = np.flatnonzero(value_norms <= DEAD_VALUE_NORM).tolist()
    return {"ranks": key_norms.size, "parameters": parameters, "key_norm": norm_summary(key_norms),
            "value_norm": norm_summary(value_norms), "dead_ranks": dead}


def bank_stats(bank: Bank, keep: Callable[[str], bool]) -> dict:
    """One bank, per module that `keep` accepts and over all of them."""
    norms, modules = {}, {}
    for module, (A, B) in bank.arrays().items():
        if keep(module):
            norms[module] = (np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0))
            modules[module] = module_summary(*norms[module], A.size + B.size)
    keys = np.concatenate([k for k, _ in norms.values()]) if norms else np.zeros(0)
    values = np.concatenate([v for _, v in norms.values()]) if norms else np.zeros(0)
    whole = module_summary(keys, values, sum(m["parameters"] for m in modules.values()))
    whole["dead_ranks"] = len(whole["dead_ranks"])
    return {"bank": bank.path.name, "task": bank.name, **whole, "modules": modules}


def rank_stats(store: MemoryStore, keep: Callable[[str], bool]) -> dict:
    """Per-bank statistics and store totals (over the modules `keep` accepts; disk size of the whole store)."""
    banks = [bank_stats(bank, keep) for bank in store.banks()]
    totals = {key: sum(b[key] for b in banks) for key in ("ranks", "parameters", "dead_ranks")}
    return {"banks": banks, "totals": {"banks": len(banks), **totals, "disk_bytes": disk_size(store.path)}}


def disk_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
