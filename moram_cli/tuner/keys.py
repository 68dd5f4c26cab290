"""How a task's new keys start: drawn at random, copied from the previous bank, or taken from the task's own inputs.

A rank outside a token's top-k gets no gradient at all, so a new key that
never wins a gate slot never learns. Random keys start far weaker than keys
trained on earlier tasks (on SmolLM2, the first bank kept about 85% of the
gate mass on later tasks' text), which is the cold start `data` keys avoid.
"""

from __future__ import annotations

import math

import torch


def kaiming_keys(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`r` keys like `nn.Linear` weights (kaiming-uniform with a = √5), drawn from `generator` for reproducibility."""
    bound = 1 / math.sqrt(in_features)
    return torch.empty(r, in_features).uniform_(-bound, bound, generator=generator)


class InputMoments:
    """Running sum and (unless `second` is off) second moment of a layer's inputs, summed over batches in float64 so
    that their order does not matter; a batch's own product is float32, which its few thousand tokens allow."""

    def __init__(self, in_features: int, second: bool = True) -> None:
        # The second moment costs in_features² per token: a mean alone (a task prototype) skips it.
        self.second = torch.zeros(in_features, in_features, dtype=torch.float64) if second else None
        self.total = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in some tokens' inputs (`x`: tokens × in_features)."""
        x = x.detach().float()
        if self.second is not None:
            self.second += (x.T @ x).to(device="cpu", dtype=torch.float64)
        self.total += x.sum(0, dtype=torch.float64).cpu()
        self.tokens += x.shape[0]


def data_keys(moments: InputMoments, old: torch.Tensor | None, r: int) -> torch.Tensor:
    """Up to `r` keys from a task's inputs: the top principal directions of their second moment outside the span of the
    `old` keys, each signed to score positively on the average input, scaled to the old keys' median norm.

    Outside the old span, a new key's score is what the old experts cannot
    already see in the input; its sign matters because the gate keeps the
    largest signed scores. The norm matches the keys it competes with (the
    kaiming norm for a first task). Fewer than `r` rows come back when the old
    keys leave fewer free directions; the caller draws the rest.
    """
    d = moments.second.shape[0]
    project = torch.eye(d, dtype=torch.float64)
    if old is not None and old.numel():
        basis = _row_basis(old.to(torch.float64))
        project -= basis.T @ basis
    free = int(round(torch.trace(project).item()))
    _, vectors = torch.linalg.eigh(project @ moments.second @ project)
    # eigh sorts ascending; a final projection removes what rounding left of the old span.
    keys = (project @ vectors[:, -min(r, free):].flip(-1)).T if free else torch.zeros(0, d, dtype=torch.float64)
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    keys *= torch.where(keys @ moments.total < 0, -1.0, 1.0).unsqueeze(1)
    return (keys * _key_norm(old)).float()


def _row_basis(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (as rows) of the span of `rows`, ignoring directions below float32 resolution."""
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    rank = int((singular > singular.max() * 1e-6).sum())
    return vh[:rank]


def _key_norm(old: torch.Tensor | None) -> float:
    if old is None or not old.numel():
        # The expected norm of a kaiming key: in_features draws of variance 1 / (3 in_features).
        return math.sqrt(1 / 3)
    return old.to(torch.float64).norm(dim=1).median().item()
