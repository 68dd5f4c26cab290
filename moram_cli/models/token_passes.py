"""Forward passes over encoded examples for observers inside the model (gate statistics, input moments)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moram_cli.data.batching import collate, length_bucketed_batches
from moram_cli.data.encode import Encoded
from moram_cli.tuner.routing import PassSeen


@torch.no_grad()
def masked_passes(model, encoded: list[Encoded], pad_id: int, batch_size: int, before_batch: Callable[[torch.Tensor], None],
                  after_batch: Callable[[], None] = lambda: None) -> None:
    """Run `model` over `encoded` in length-bucketed batches; `before_batch` gets each batch's flattened token mask
    (True where not padding), so an observer can drop padded positions from what it sees. An observer may end a batch's
    pass early by raising `PassSeen`."""
    model.eval()
    for indices in length_bucketed_batches([len(e.input_ids) for e in encoded], batch_size, seed=0):
        batch = collate([encoded[i] for i in indices], pad_id)
        before_batch(batch["attention_mask"].flatten().bool().to(model.device))
        try:
            model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                  use_cache=False, logits_to_keep=1)
        except PassSeen:
            pass
        after_batch()
