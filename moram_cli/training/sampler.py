"""Which examples each optimiser step trains on: length-bucketed global batches, reshuffled every epoch."""

from __future__ import annotations

import os
import sys

from moram_cli.data.batching import length_bucketed_batches


class StepBatches:
    """`batches[step]`: the global batch of an optimiser step, a function of the step alone (so a resumed run sees the same data)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.per_epoch = -(-len(lengths) // batch_size)
        if len(lengths) < batch_size:
            warn_short_data(len(lengths), batch_size)
        self._epoch, self._batches = -1, []

    def __getitem__(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, length_bucketed_batches(self.lengths, self.batch_size, self.seed + epoch)
        return self._batches[index]


def warn_short_data(examples: int, batch_size: int) -> None:
    """Say that the data is smaller than one batch, where the run still trains on it: each epoch is then a single step."""
    # Every process of a launch builds the same batches; one of them says so.
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {examples} example(s) are fewer than one batch (--batch-size {batch_size}), so each epoch is a single step; "
              "lower --batch-size for more steps", file=sys.stderr)
