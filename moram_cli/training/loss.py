"""Completion-only loss that computes logits only where there is a label."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moram_cli.data.encode import IGNORE_INDEX


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, like the model's own loss.

    The vocabulary projection is most of a small model's cost when run on
    every position, so only the span of positions that predict a label is
    projected (`logits_to_keep` with explicit indices).
    """
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    start, end = int(labelled[0]), int(labelled[-1]) + 1
    keep = torch.arange(start, end, device=labels.device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = labels[:, start + 1 : end + 1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
