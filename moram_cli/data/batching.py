"""Grouping encoded examples into padded batches.

Batches are drawn from length-sorted windows of a shuffled order: examples of
similar length share a batch (less padding) while the data stays well mixed.
"""

from __future__ import annotations

import random

import torch

from moram_cli.data.encode import IGNORE_INDEX, Encoded

_WINDOW_BATCHES = 50


def length_bucketed_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Index batches covering every example once; the same seed always gives the same batches.

    shuffle=False gives consecutive batches in the original order. Only the
    last batch can be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(lengths)))
    if not shuffle:
        return _chunks(order, batch_size)
    rng = random.Random(seed)
    rng.shuffle(order)
    batches = []
    # Windows are whole multiples of batch_size, so only the final window ends in a short batch.
    for window in _chunks(order, _WINDOW_BATCHES * batch_size):
        window.sort(key=lambda index: lengths[index])
        batches.extend(_chunks(window, batch_size))
    rng.shuffle(batches)
    return batches


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels, right-padded to the batch's longest example."""
    width = max(len(item.input_ids) for item in batch)
    input_ids, attention_mask, labels = [], [], []
    for item in batch:
        pad = width - len(item.input_ids)
        input_ids.append(item.input_ids + [pad_id] * pad)
        attention_mask.append([1] * len(item.input_ids) + [0] * pad)
        labels.append(item.labels + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
