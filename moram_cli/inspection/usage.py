"""Gate totals turned into a module's usage report: bank shares, busiest ranks, ranks never selected."""

from __future__ import annotations

import torch

from moram_cli.inspection.gates import GateStats


def module_usage(stats: GateStats, banks: list[str], sizes: list[int], top: int) -> dict:
    """Usage of one module's ranks; `banks` and `sizes` name and count its ranks bank by bank, oldest first."""
    total = stats.mass.sum()
    share = stats.mass / total if total > 0 else stats.mass
    parts = share.split(sizes)
    never = (stats.selected == 0).split(sizes)
    return {
        "ranks": share.numel(),
        "ranks_for_99_mass": stats.mean_ranks_for_mass,
        "bank_share": {bank: part.sum().item() for bank, part in zip(banks, parts)},
        "top": top_ranks(share, banks, sizes, top),
        "never_selected": {bank: unused.nonzero().flatten().tolist() for bank, unused in zip(banks, never)},
        "rank_share": {bank: part.tolist() for bank, part in zip(banks, parts)},
    }


def top_ranks(share: torch.Tensor, banks: list[str], sizes: list[int], count: int) -> list[dict]:
    """The `count` ranks with the largest share of gate mass, named by bank and index inside it."""
    values, indices = share.topk(min(count, share.numel()))
    starts = torch.tensor([0, *sizes]).cumsum(0)
    # right=True sends a rank on a boundary to the bank that starts there, skipping banks left without ranks.
    owners = torch.bucketize(indices, starts[1:], right=True)
    return [
        {"bank": banks[owner], "rank": index - int(starts[owner]), "share": value}
        for owner, index, value in zip(owners.tolist(), indices.tolist(), values.tolist())
    ]
