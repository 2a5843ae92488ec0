"""Which samples each rank reads in an epoch, and how its last batches are padded.

Both loaders follow the rule of DALI's readers, so that they split data identically: the split's
samples, in shard order, are cut into `world_size` contiguous ranges (rank r gets
[n·r // W, n·(r+1) // W)); every rank then reads ceil(ceil(n / W) / B) batches, the missing positions
filled with copies of the last sample read, marked invalid. Every sample is thus read exactly once per
epoch by exactly one rank, plus fewer than B padding copies per rank when ranges are equal (at most B
when they differ by one sample).

The order within a rank's epoch (`epoch_order`) is a function of (seed, epoch, rank) alone, so batch k of
an epoch is known without reading batches 0..k-1: a resumed epoch starts reading at batch k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from colorize_dist.data.manifest import Shard

ORDER_STREAM = 1  # spawn key of the order's random stream, apart from the augmentations' ([seed, position])


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

    @property
    def shard_indices(self) -> range:
        """The shards holding this rank's samples (indices into `shards`)."""
        ends = np.cumsum([shard.samples for shard in self.shards])
        first = int(np.searchsorted(ends, self.start, side="right"))
        last = int(np.searchsorted(ends, self.stop - 1, side="right"))
        return range(first, last + 1)

    def valid(self, batch_index: int) -> np.ndarray:
        """Which positions of this rank's batch `batch_index` hold real samples (not padding)."""
        positions = batch_index * self.batch_size + np.arange(self.batch_size)
        return positions < self.stop - self.start


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit seed (DALI's range) for one rank's epoch, from (seed, epoch, rank) only."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFF_FFFF)


def epoch_order(ranks: RankSlice, seed: int | None, window: int) -> np.ndarray:
    """The split positions this rank reads in one epoch, in order, padded to `batches_per_epoch × batch_size`
    with copies of the last one.

    seed None (validation): in shard order. Otherwise the runs of the rank's range that lie in one shard are
    visited in a random order, and samples are shuffled within a sliding window of `window` positions (each
    moves by less than `window`), so reads stay near-sequential; `shards make` writes shards pre-shuffled.
    """
    positions = np.arange(ranks.start, ranks.stop, dtype=np.int64)
    if seed is not None:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ORDER_STREAM,)))
        runs = np.split(positions, np.searchsorted(positions, shard_starts(ranks)[1:]))
        runs = [runs[i] for i in rng.permutation(len(runs)) if len(runs[i])]
        positions = np.concatenate(runs)
        jitter = rng.uniform(0, max(1, window), len(positions))
        positions = positions[np.argsort(np.arange(len(positions)) + jitter, kind="stable")]
    padding = ranks.batches_per_epoch * ranks.batch_size - len(positions)
    return np.concatenate([positions, np.full(padding, positions[-1], dtype=np.int64)])


def shard_starts(ranks: RankSlice) -> np.ndarray:
    """The split position of each shard's first sample."""
    return np.cumsum([0] + [shard.samples for shard in ranks.shards[:-1]], dtype=np.int64)


def locate(ranks: RankSlice, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, sample index in that shard) of each split position."""
    starts = shard_starts(ranks)
    shard = np.searchsorted(starts, positions, side="right") - 1
    return shard, positions - starts[shard]
