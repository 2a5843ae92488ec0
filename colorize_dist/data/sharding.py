"""Which samples each rank reads in an epoch, and how its last batches are padded.

Both loaders follow the rule of DALI's readers, so that they split data identically: the split's
samples, in shard order, are cut into `world_size` contiguous ranges (rank r gets
[n·r // W, n·(r+1) // W)); every rank then reads ceil(ceil(n / W) / B) batches, the missing positions
filled with copies of the last sample read, marked invalid. Every sample is thus read exactly once per
epoch by exactly one rank, plus fewer than B padding copies per rank when ranges are equal (at most B
when they differ by one sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from colorize_dist.data.shards import Shard


@dataclass(frozen=True)
class RankSlice:
    shards: tuple[Shard, ...]
    batch_size: int
    rank: int
    world_size: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.total < self.world_size:
            raise ValueError(f"{self.total} samples cannot be split over {self.world_size} ranks")

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def start(self) -> int:
        return self.total * self.rank // self.world_size

    @property
    def stop(self) -> int:
        return self.total * (self.rank + 1) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        largest_range = -(-self.total // self.world_size)
        return -(-largest_range // self.batch_size)

    def valid(self, batch_index: int) -> np.ndarray:
        """Which positions of this rank's batch `batch_index` hold real samples (not padding)."""
        positions = batch_index * self.batch_size + np.arange(self.batch_size)
        return positions < self.stop - self.start


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit seed (DALI's range) for one rank's epoch, from (seed, epoch, rank) only."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFF_FFFF)
