"""Which samples each rank reads, and in which order: one order per epoch for the whole job, cut into global batches.

The split's n samples are visited in one order per epoch, a function of (seed, epoch) alone (`epoch_order`;
validation: shard order). From sample s of an epoch on, that order is cut into global batches of `global_batch`
samples (one optimizer step, train.batch_size); global batch k is split into accumulation × world_size
micro-batches of `micro_batch` samples, micro-batch m of rank r holding the epoch's slots

    s + k·G + (m·W + r)·b  ...  s + k·G + (m·W + r + 1)·b − 1          (G global, W ranks, b micro-batch)

So a global batch is the same set of samples whatever the number of ranks or micro-batches (and the same crops:
the augmentations are drawn per slot, see `augment`), every sample is read exactly once per epoch by exactly one
rank, and a run resumed at sample s — on another number of ranks, or with another split of the global batch —
reads exactly what an uninterrupted run reads from s on. The last global batch of an epoch may be short: its missing
slots are padding, copies of the epoch's first samples marked invalid (they weigh nothing in the losses and metrics).
Every rank reads from every shard; reads are by index (see `reading`), so no rank needs a shard range of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from colorize_dist.data.manifest import Shard

ORDER_STREAM = 1  # spawn key of the order's random stream, apart from the augmentations' (see `augment`)


@dataclass(frozen=True)
class SplitSamples:
    """The samples of one split, in shard order: position p is sample p − start of the shard holding it."""

    shards: tuple[Shard, ...]
    starts: np.ndarray = field(init=False, repr=False, compare=False)  # each shard's first position

    def __post_init__(self):
        counts = [shard.samples for shard in self.shards]
        object.__setattr__(self, "starts", np.cumsum([0, *counts[:-1]], dtype=np.int64))

    @property
    def total(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index in that shard) of each split position."""
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        return shard, positions - self.starts[shard]


@dataclass(frozen=True)
class Layout:
    """How a global batch is divided between ranks and micro-batches."""

    global_batch: int  # samples per optimizer step, all ranks and micro-batches together
    micro_batch: int  # samples per rank and micro-batch
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.micro_batch < 1 or self.global_batch % (self.micro_batch * self.world_size):
            raise ValueError(f"the global batch ({self.global_batch}) must be a positive multiple of micro_batch × "
                             f"world_size = {self.micro_batch} × {self.world_size}")

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank and optimizer step."""
        return self.global_batch // (self.micro_batch * self.world_size)

    def steps(self, total: int, start: int = 0) -> int:
        """Global batches in an epoch of `total` samples from sample `start` on."""
        return -(-(total - start) // self.global_batch)


@dataclass(frozen=True)
class MicroSlots:
    """One micro-batch of one rank: which slots of which epoch's order it holds, and the global batch around it."""

    epoch: int
    step_start: int  # the epoch slot its global batch starts at
    step_end: int  # the epoch slot after its global batch: the epoch's position once this optimizer step is done
    index: int  # its place among the rank's micro-batches of that global batch (0 .. accumulation − 1)
    slots: np.ndarray  # epoch slots; those ≥ the split's size are padding
    valid: np.ndarray  # bool per slot: a real sample (not padding)


def micro_batches(layout: Layout, total: int, epoch: int, start: int = 0) -> Iterator[MicroSlots]:
    """This rank's micro-batches of `epoch` from epoch slot `start` on, in order."""
    if not 0 <= start <= total:
        raise ValueError(f"the start sample must be in [0, {total}], got {start}")
    width, rank_offset = layout.micro_batch, np.arange(layout.micro_batch, dtype=np.int64)
    for step_start in range(start, total, layout.global_batch):
        step_end = min(step_start + layout.global_batch, total)
        for index in range(layout.accumulation):
            first = step_start + (index * layout.world_size + layout.rank) * width
            slots = first + rank_offset
            yield MicroSlots(epoch, step_start, step_end, index, slots, slots < step_end)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed (DALI's range) of one epoch, from (seed, epoch) only: the same on every rank."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFF_FFFF)


def epoch_order(split: SplitSamples, seed: int | None, window: int, samples_per_read: int) -> np.ndarray:
    """The split positions an epoch visits, in order (the epoch's slots → positions).

    seed None (validation): shard order. Otherwise the shards are visited in a random order, cut into runs of
    `samples_per_read` neighbouring samples (cut at a random place per shard and epoch, so a shard's first and last
    runs may be shorter; none crosses a shard's end), and the runs are shuffled within a sliding window of `window`
    slots (each moves by less than `window` + its length): reads stay near-sequential and a micro-batch reads a run
    at once (see `reading`); `shards make` writes shards pre-shuffled. One sample per run is the sample-level shuffle
    of earlier versions, draw for draw.
    """
    positions = np.arange(split.total, dtype=np.int64)
    if seed is None:
        return positions
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ORDER_STREAM,)))
    shards = np.split(positions, split.starts[1:])
    positions = np.concatenate([shards[i] for i in rng.permutation(len(shards))])
    shard, in_shard = split.locate(positions)
    if samples_per_read > 1:  # where each shard's runs are cut moves every epoch: no fixed groups of neighbours
        in_shard = in_shard + rng.integers(0, samples_per_read, len(shards))[shard]
    starts = np.flatnonzero((in_shard % samples_per_read == 0) | (np.diff(shard, prepend=-1) != 0))  # runs' firsts
    lengths = np.diff(starts, append=len(positions))
    jitter = rng.uniform(0, max(1, window), len(starts))
    runs = np.argsort(starts + jitter, kind="stable")
    # slot t of the epoch, in the k-th run placed: its first slot there + (t − where that run begins in the epoch)
    placed = np.cumsum(lengths[runs]) - lengths[runs]
    slots = np.arange(len(positions)) + np.repeat(starts[runs] - placed, lengths[runs])
    return positions[slots]


def slot_positions(order: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The split positions of some epoch slots; padding slots (past the end) repeat the epoch's first samples."""
    return order[slots % len(order)]
