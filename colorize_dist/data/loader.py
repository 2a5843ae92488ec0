"""Batches of (l, ab) for training and evaluation, from DALI or the reference loader, on every rank.

    loader = build_loader(cfg, "train", batch_size=32, rank=rank, world_size=world, device=device, seed=0)
    for epoch in range(start_epoch, epochs):
        for batch in loader.epoch(epoch, start_batch=resumed_batches if epoch == start_epoch else 0):
            ...  # batch.l, batch.ab, batch.keys, batch.valid

Each sample of the split is read exactly once per epoch by exactly one rank; every rank yields
`batches_per_epoch` batches, the last ones padded with copies marked `valid == False` (see `sharding`).
The order and the augmentations depend on (seed, epoch) only, so `epoch(e, start_batch=k)` yields exactly
what an uninterrupted epoch e yields after its first k batches, without reading or decoding those k.

A loader keeps its DALI pipeline (or nothing, for the reference loader) from one epoch to the next; `close()`
(or `with`) releases it. A damaged shard raises ShardDataError (one line naming the shard and the fix) on the
rank that reads it, and ends every other rank of the job with the same line (see `failure`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from colorize_dist.color import rgb_to_l_ab
from colorize_dist.data import failure
from colorize_dist.data.config import DataConfig
from colorize_dist.data.manifest import SPLITS, ManifestError, MissingShardsError, list_shards
from colorize_dist.data.sharding import RankSlice

log = logging.getLogger(__name__)


@dataclass
class Batch:
    l: torch.Tensor  # (B, 1, H, W), L/50 - 1
    ab: torch.Tensor  # (B, 2, H, W), ab/110
    keys: list[str]  # "<shard>/<key>", unique per sample of the set
    valid: torch.Tensor  # (B,) bool; False for the padding copies that even out the ranks


class ColorLoader:
    def __init__(self, source, ranks: RankSlice, *, device: torch.device, dtype: torch.dtype):
        self.source, self.ranks, self.device, self.dtype = source, ranks, device, dtype

    @property
    def batches_per_epoch(self) -> int:
        return self.ranks.batches_per_epoch

    def describe(self) -> str:
        """Which loader and decoder path this is, in one line (for the log)."""
        return self.source.describe()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch, start_batch + 1, ... of `epoch` on this rank."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        try:
            for batch_index, (rgb, keys) in enumerate(self.source.batches(epoch, start_batch), start=start_batch):
                # One thread: the loader's parallelism is its workers (DALI threads, DataLoader processes), which
                # an OpenMP team here would contend with (and wait on) for the same cores.
                l, ab = rgb_to_l_ab(rgb, dtype=self.dtype, num_threads=1 if rgb.device.type == "cpu" else None)
                valid = torch.from_numpy(self.ranks.valid(batch_index)).to(self.device)
                yield Batch(l=l, ab=ab, keys=keys, valid=valid)
        except ManifestError as exc:
            failure.publish(str(exc))
            raise

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> ColorLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def build_loader(cfg: DataConfig, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32) -> ColorLoader:
    """The loader of one split on one rank: "train" shuffles and augments, "val" is deterministic.

    Every shard of the split is checked to be there with the size its manifest records, and this rank's shard
    indexes to agree with the manifest, before anything is read."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.shards is None:
        raise ValueError("data.shards is not set; make a shard set with `colorize-dist shards synth DIR` "
                         "or `colorize-dist shards make SRC DIR` and set data.shards=DIR")
    device = torch.device(device)
    failure.watch()
    try:
        ranks = RankSlice(tuple(list_shards(cfg.shards, split)), batch_size, rank, world_size)
        source_class = _source_class(cfg.backend)
        source = source_class(ranks, cfg, train=split == "train", seed=seed, device=device,
                              directory=Path(cfg.shards))
    except (ManifestError, MissingShardsError) as exc:
        failure.publish(str(exc))
        raise
    return ColorLoader(source, ranks, device=device, dtype=dtype)


def first_batch(cfg: DataConfig, split: str, *, batch_size: int, device: torch.device | str = "cpu") -> Batch:
    """The first batch of `split` (e.g. the trainer's fixed sample images), its loader closed at once."""
    with build_loader(cfg, split, batch_size=batch_size, device=device) as loader:
        return next(loader.epoch(0))


def _source_class(backend: str) -> type:
    if backend == "auto":
        backend = "dali" if dali_available() else "reference"
    if backend == "dali":
        if not dali_available():
            raise ModuleNotFoundError("data.backend=dali but nvidia.dali is not installed; "
                                      "pip install 'colorize-dist[dali]' or set data.backend=reference")
        from colorize_dist.data.dali import DaliSource

        return DaliSource
    from colorize_dist.data.reference import ReferenceSource

    return ReferenceSource


@functools.cache
def dali_available() -> bool:
    """Whether DALI is importable; says once in the log when it is not and the reference loader is used."""
    available = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    if not available:
        log.warning("nvidia.dali is not installed: using the reference loader (PIL in DataLoader workers), "
                    "which is slower; pip install 'colorize-dist[dali]' for the DALI pipeline")
    return available
