"""The per-rank gate of MoRAM (steps 2-5 of the method), over all ranks or within each bank."""

from __future__ import annotations

import torch


def kept_ranks(z: torch.Tensor, k: int, temperature: float, threshold: float = 0.0,
               member: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The non-zero part of the gate for projections `z` (last dimension = ranks): the indices of the kept ranks (None
    when every rank is kept) and their weights.

    Each rank is scored by its share of the L2 norm of `z`, the `k_eff` best
    are kept and softmax-ed with `temperature`. A positive `threshold` then
    zeroes ranks whose normalised score is below it, without renormalising:
    callers pass it at inference only. `member` (boolean, broadcastable to
    `z`) confines each row to some ranks, as routing does: the norm and the
    choice run over them alone, exactly as if the others did not exist.
    """
    ranks = z.shape[-1]
    inside = z if member is None else z * member
    s = inside / inside.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    if member is not None:
        s = s.masked_fill(~member, float("-inf"))
    k_eff = min(max(k, 2), ranks)
    # top-k indices carry no gradient; the kept scores do, through `s`.
    indices = s.topk(k_eff, dim=-1).indices if k_eff < ranks else None
    kept = s if indices is None else s.gather(-1, indices)
    g = short_softmax(kept / temperature)
    if member is not None:
        # A row whose group has fewer ranks than k here (or none: pruning can empty a bank's module) keeps only those.
        g = torch.where(torch.isfinite(kept), g, 0.0)
    if threshold > 0:
        g = g * (kept >= threshold).to(g.dtype)
    return indices, g


def short_softmax(x: torch.Tensor) -> torch.Tensor:
    """`torch.softmax(x, -1)` for a short last dimension, as the k kept scores of every bank: torch's CPU kernel pays per
    row (65 536 rows of 4: 2.6 ms against 0.6 ms for these operations). The maximum is a constant to autograd, as
    softmax's shift invariance allows, so the gradient is softmax's."""
    e = (x - x.amax(-1, keepdim=True).detach()).exp()
    return e / e.sum(-1, keepdim=True)


def kept_per_bank(z: torch.Tensor, k: int, temperature: float, threshold: float, member: torch.Tensor | None,
                  table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`kept_ranks` within each bank, every bank's kept ranks together (k per bank): the gate of `gate_scope` "bank".

    `table` (banks × the largest bank's ranks) lists each bank's rank indices,
    padded with -1. A padded place, or a rank outside `member`, is never kept;
    its slot comes back with weight 0 (and some index).
    """
    if table.numel() == z.shape[-1]:
        # No padding, so every bank has the same size and the table is 0..R-1 row by row: `z` viewed bank by bank.
        ranks, per_bank = table, z.unflatten(-1, table.shape)
        inside = None if member is None else member.unflatten(-1, table.shape)
    else:
        ranks = table.clamp_min(0)
        per_bank = z[..., ranks]
        inside = table >= 0 if member is None else (table >= 0) & member[..., ranks]
    indices, g = kept_ranks(per_bank, k, temperature, threshold, inside)
    chosen = ranks.expand(*g.shape[:-1], ranks.shape[-1])
    if indices is not None:
        chosen = chosen.gather(-1, indices)
    return chosen.flatten(-2), g.flatten(-2)


def rank_gate(z: torch.Tensor, k: int, temperature: float, threshold: float = 0.0, member: torch.Tensor | None = None) -> torch.Tensor:
    """Gate weights `g` for projections `z`, every rank's (zero where not kept): see `kept_ranks`."""
    return spread(z, *kept_ranks(z, k, temperature, threshold, member))


def spread(z: torch.Tensor, indices: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """`values` of the kept ranks (`indices`, None for all) at their places among all of `z`'s ranks, zero elsewhere.

    Added, not written: a per-bank gate's empty slots carry weight 0 at an index a kept rank may have too.
    """
    return values if indices is None else torch.zeros_like(z).scatter_add(-1, indices, values)
