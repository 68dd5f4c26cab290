"""Collecting how the gate uses each rank over a data set, in running totals per module."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moram_cli.data.encode import encode_dataset
from moram_cli.data.jsonl import Example
from moram_cli.errors import MoramError
from moram_cli.models.token_passes import masked_passes
from moram_cli.store import MemoryStore
from moram_cli.tuner import MoramModel

MASS_COVERED = 0.99


def check_gated(store: MemoryStore) -> None:
    """Gate statistics exist for MoRAM only: the lora and inclora baselines add their ranks up without a gate."""
    if store.config.method != "moram":
        raise MoramError(f"{store.path}: the store's method is {store.config.method}, which has no gate to measure; gate statistics and pruning need a moram store")


class GateStats:
    """Running totals of one module's gates; per-token gates are folded in and dropped.

    `mass[i]` sums rank i's gate weight over all tokens, `selected[i]` counts
    the tokens whose gate kept rank i (g > 0), and `ranks_for_mass` sums, over
    tokens, how many of the largest gates it takes to reach 99% of that
    token's gate mass.
    """

    def __init__(self, ranks: int, kept: int) -> None:
        self.mass = torch.zeros(ranks, dtype=torch.float64)
        self.selected = torch.zeros(ranks, dtype=torch.long)
        self.tokens = 0
        self.ranks_for_mass = 0
        # Only the ranks the top-k keeps (`kept` per token) can carry any gate weight.
        self.k_eff = min(kept, ranks)

    def add(self, g: torch.Tensor) -> None:
        """Fold in the gates of some tokens: `g` is tokens × ranks."""
        self.mass += g.sum(0, dtype=torch.float64).cpu()
        self.selected += (g > 0).sum(0).cpu()
        largest = g.topk(self.k_eff, dim=-1).values.cumsum(-1)
        total = largest[:, -1:]
        # Ranks strictly below the 99% mark, plus the one that crosses it; a fully thresholded token needs none.
        needed = (largest < MASS_COVERED * total).sum(-1) + (total[:, 0] > 0)
        self.ranks_for_mass += int(needed.sum())
        self.tokens += g.shape[0]

    @property
    def mean_ranks_for_mass(self) -> float:
        return self.ranks_for_mass / max(self.tokens, 1)


def collect_gates(
    model: MoramModel, tokenizer, examples: list[Example], batch_size: int, max_length: int, keep: Callable[[str], bool] = lambda name: True
) -> dict[str, GateStats]:
    """Gate statistics of every adapted module that `keep` accepts, over all prompt and completion tokens of `examples`.

    The examples are encoded as for training (same truncation) and run in
    length-bucketed batches; padding positions are left out.
    """
    encoded, _ = encode_dataset(examples, tokenizer, max_length)
    layers = {name: layer for name, layer in model.moram_layers().items() if keep(name)}
    stats = {name: GateStats(layer.frozen_ranks, layer.kept_per_token) for name, layer in layers.items()}
    current = {}
    for name, layer in layers.items():
        layer.gate_observer = lambda g, totals=stats[name]: totals.add(g.flatten(0, -2)[current["tokens"]])
    try:
        masked_passes(model, encoded, tokenizer.pad_token_id, batch_size, lambda mask: current.update(tokens=mask))
    finally:
        for layer in layers.values():
            layer.gate_observer = None
    return stats
