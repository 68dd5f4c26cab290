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
    """Running second moment and sum of a layer's inputs, in float64 so the order of batches does not matter."""

    def __init__(self, in_features: int) -> None:
        self.second = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.total = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in some tokens' inputs (`x`: tokens × in_features)."""
        x = x.detach().to(device="cpu", dtype=torch.float64)
        self.second += x.T @ x
        self.total += x.sum(0)
        self.tokens += x.shape[0]

    def mean_second(self) -> torch.Tensor:
        """The second moment per token, so that tasks of different sizes weigh alike."""
        return self.second / max(self.tokens, 1)

    def profile(self, m: int) -> torch.Tensor:
        """A rank-`m` summary of `mean_second()` (`m` × in_features rows `p`, `pᵀp` ≈ it): what a bank keeps of its task's
        inputs, so later tasks' keys can avoid them without their data."""
        values, vectors = torch.linalg.eigh(self.mean_second())
        top = slice(-min(m, len(values)), None)
        return (vectors[:, top] * values[top].clamp_min(0).sqrt()).T.flip(0).float()


def data_keys(moments: InputMoments, old: torch.Tensor | None, r: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """Up to `r` keys from a task's inputs: the top principal directions of their second moment outside the span of the
    `old` keys, each signed to score positively on the average input, scaled to the old keys' median norm. With
    `avoid` (earlier tasks' per-token second moment, positive definite), the directions where the new inputs' energy
    is largest relative to theirs.

    Outside the old span, a new key's score is what the old experts cannot
    already see in the input; its sign matters because the gate keeps the
    largest signed scores. A ratio, not a difference, against earlier inputs:
    a direction that every task's text fills (a transformer's few huge
    hidden dimensions) would still win the gate on old text. The norm matches
    the keys it competes with (the kaiming norm for a first task). Fewer than
    `r` rows come back when the old keys leave fewer free directions; the
    caller draws the rest.
    """
    free = _complement_basis(old, moments.second.shape[0])
    # The generalised eigenproblem N v = λ O v inside the free directions, through O's Cholesky factor L.
    chol = torch.linalg.cholesky(free @ avoid.to(torch.float64) @ free.T) if avoid is not None else None
    energy = free @ moments.mean_second() @ free.T
    if chol is not None:
        energy = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, energy, upper=False).T, upper=False).T
    _, vectors = torch.linalg.eigh(energy)
    top = vectors[:, -min(r, free.shape[0]):].flip(-1)
    if chol is not None:
        top = torch.linalg.solve_triangular(chol.T, top, upper=True)
    keys = (free.T @ top).T
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    keys *= torch.where(keys @ moments.total < 0, -1.0, 1.0).unsqueeze(1)
    return (keys * _key_norm(old)).float()


def recorded_moment(profiles: list[torch.Tensor]) -> torch.Tensor:
    """Earlier tasks' per-token second moment from their banks' profiles (`profile`), as `data_keys` avoids it.

    A profile keeps a task's leading directions only; each is taken to carry
    at least its smallest recorded energy in every other direction, which also
    makes the sum positive definite.
    """
    d = profiles[0].shape[1]
    total = torch.zeros(d, d, dtype=torch.float64)
    for profile in profiles:
        p = profile.to(torch.float64)
        total += p.T @ p + p[-1].square().sum() * torch.eye(d, dtype=torch.float64)
    return total + 1e-9 * max(total.trace().item() / d, 1e-12) * torch.eye(d, dtype=torch.float64)


def _complement_basis(old: torch.Tensor | None, d: int) -> torch.Tensor:
    """An orthonormal basis (as rows) of the directions orthogonal to the `old` keys, ignoring those below float32 resolution."""
    if old is None or not old.numel():
        return torch.eye(d, dtype=torch.float64)
    _, singular, vh = torch.linalg.svd(old.to(torch.float64), full_matrices=True)
    rank = int((singular > singular.max() * 1e-6).sum())
    return vh[rank:]


def _key_norm(old: torch.Tensor | None) -> float:
    if old is None or not old.numel():
        # The expected norm of a kaiming key: in_features draws of variance 1 / (3 in_features).
        return math.sqrt(1 / 3)
    return old.to(torch.float64).norm(dim=1).median().item()
