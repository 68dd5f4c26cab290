"""Length-bucketed batches that reshuffle every epoch."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from moram_cli.data.batching import length_bucketed_batches


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (little padding on CPU), reshuffled per epoch via `set_epoch`."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(length_bucketed_batches(self.lengths, self.batch_size, self.seed + self.epoch))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
