"""The per-rank gate of MoRAM (steps 2-5 of the method)."""

from __future__ import annotations

import torch


def rank_gate(z: torch.Tensor, k: int, temperature: float, threshold: float = 0.0) -> torch.Tensor:
    """Gate weights `g` for projections `z` (last dimension = ranks).

    Each rank is scored by its share of the L2 norm of `z`, the `k_eff` best
    are kept and softmax-ed with `temperature`. A positive `threshold` then
    zeroes ranks whose normalised score is below it, without renormalising:
    callers pass it at inference only.
    """
    ranks = z.shape[-1]
    s = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    k_eff = min(max(k, 2), ranks)
    if k_eff < ranks:
        kept = s.topk(k_eff, dim=-1).indices
        # top-k indices carry no gradient; the kept scores do, through `s`.
        s_masked = torch.full_like(s, float("-inf")).scatter(-1, kept, s.gather(-1, kept))
    else:
        s_masked = s
    g = torch.softmax(s_masked / temperature, dim=-1)
    if threshold > 0:
        g = g * (s >= threshold).to(g.dtype)
    return g
