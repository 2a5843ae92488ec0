"""Batches of (l, ab) for training and evaluation, from DALI or the reference loader, on every rank.

    loader = build_loader(cfg, "train", batch_size=8, global_batch=64, rank=rank, world_size=world, device=device)
    for epoch in range(start_epoch, epochs):
        for batch in loader.epoch(epoch, start=resumed_sample if epoch == start_epoch else 0):
            ...  # batch.l, batch.ab, batch.keys, batch.valid, batch.slots

The epoch's samples are cut into global batches of `global_batch` samples, each split into micro-batches of
`batch_size` per rank (see `sharding`): every sample is read exactly once per epoch by exactly one rank, every
rank yields the same number of micro-batches, the padding copies that fill the last global batch are marked
`valid == False`, and a global batch holds the same samples, with the same crops, whatever the number of ranks.
The order and the augmentations depend on (seed, epoch) only, so `epoch(e, start=s)` yields exactly what an
uninterrupted epoch e yields from sample s on, without reading or decoding anything before it.

A loader keeps its DALI pipeline (or nothing, for the reference loader) from one epoch to the next; `close()`
(or `with`) releases it. A damaged shard raises ShardDataError (one line naming the shard and the fix) on the
rank that reads it, and ends every other rank of the job with the same line (see `failure`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from colorize_dist import collectives
from colorize_dist.color import rgb_to_l_ab
from colorize_dist.data import failure
from colorize_dist.data.cache import ShardCache
from colorize_dist.data.config import DataConfig
from colorize_dist.data.manifest import SPLITS, ManifestError, MissingShardsError, ShardsUnavailable, list_shards
from colorize_dist.data.reading import BatchReading, EncodedBatch
from colorize_dist.data.sharding import Layout, MicroSlots, SplitSamples
from colorize_dist.data.store import STARTUP_HINT, RemoteStore, open_store
from colorize_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    l: torch.Tensor  # (B, 1, H, W), L/50 - 1
    ab: torch.Tensor  # (B, 2, H, W), ab/110
    keys: list[str]  # "<shard>/<key>", unique per sample of the set
    valid: torch.Tensor  # (B,) bool on the device; False for the padding copies that fill the last global batch
    positions: np.ndarray  # (B,) each sample's position in its split (shard order), on the host
    slots: MicroSlots  # where the micro-batch is in its epoch (host-side `valid` included)


class DeviceHold:
    """Device tensors kept alive until the work queued after them on their stream has run.

    A source's batch may be memory the source reuses: a DLPack view of a DALI output gives its memory back to DALI's
    pool when it is dropped, and DALI may write the next batch there at once, while the kernel queued on torch's
    stream to read it may not have run yet. `keep` records an event on the
    current stream and lets go of each tensor only once its event has passed (checked without waiting)."""

    def __init__(self):
        self.held: deque[tuple[torch.Tensor, torch.cuda.Event]] = deque()

    def keep(self, tensor: torch.Tensor) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        self.held.append((tensor, event))
        while self.held and self.held[0][1].query():
            self.held.popleft()

    def release(self) -> None:
        """Wait for the work on every held tensor (the pipeline is about to go), then let go of them."""
        for _, event in self.held:
            event.synchronize()
        self.held.clear()


class Source(Protocol):
    """What decodes one rank's micro-batches for a ColorLoader: `DaliSource` (data/dali.py) or `ReferenceSource`
    (data/reference.py), made as `Source(reading, layout, cfg, device=device)`."""

    @property
    def resize_filter(self) -> str:
        """What resizes each crop to the resolution."""

    def describe(self) -> str:
        """Which loader and decoder path this is, in one line."""

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, EncodedBatch]]:
        """uint8 RGB crops (B, H, W, 3), and what was read, for each of this rank's micro-batches of `epoch` from
        sample `start` on."""

    def close(self) -> None:
        """Release the pipeline or the workers' state, and the shard files."""


class ColorLoader:
    def __init__(self, source: Source, layout: Layout, split: SplitSamples, *, device: torch.device,
                 dtype: torch.dtype, remote: bool = False, publish_outages: bool = True):
        self.source, self.layout, self.split, self.device, self.dtype = source, layout, split, device, dtype
        self.remote = remote  # the shards are at a URL: reads can fail for a while with ShardsUnavailable
        self.publish_outages = publish_outages
        self.hold = DeviceHold()  # device batches handed to the kernel, until it has run

    @property
    def samples(self) -> int:
        """Samples in the split: an epoch's length."""
        return self.split.total

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) in a whole epoch."""
        return self.layout.steps(self.samples)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches this rank yields in a whole epoch."""
        return self.steps_per_epoch * self.layout.accumulation

    @property
    def resize_filter(self) -> str:
        """What resizes each crop to the resolution (the loaders' filters differ by rounding)."""
        return self.source.resize_filter

    def describe(self) -> str:
        """Which loader and decoder path this is, in one line (for the log)."""
        return self.source.describe()

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches of `epoch` from sample `start` of the epoch on."""
        if not 0 <= start <= self.samples:
            raise ValueError(f"start must be in [0, {self.samples}] (samples of the epoch), got {start}")
        try:
            for rgb, encoded in self.source.batches(epoch, start):
                # One thread: the loader's parallelism is its workers (DALI threads, DataLoader processes), which
                # an OpenMP team here would contend with (and wait on) for the same cores.
                l, ab = rgb_to_l_ab(rgb, dtype=self.dtype, num_threads=1 if rgb.device.type == "cpu" else None)
                if rgb.device.type == "cuda":
                    self.hold.keep(rgb)
                valid = upload(encoded.slots.valid, self.device)
                yield Batch(l=l, ab=ab, keys=encoded.keys, valid=valid, positions=encoded.positions,
                            slots=encoded.slots)
        except ManifestError as exc:
            if self.publish_outages or not isinstance(exc, ShardsUnavailable):
                failure.publish(str(exc))
            raise

    def close(self) -> None:
        self.hold.release()
        self.source.close()

    def __enter__(self) -> ColorLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ShardServerDown(UserError):
    """Raised on every rank alike by `agree_on_outage`: some rank's shard server stopped answering; `reason` is that
    rank's line (the URL, what was tried, for how long). The training loop checkpoints, then tells the user how to go
    on; anywhere else (the last validation of a resumed finished run) it is that line and "rerun once it answers"."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}; {STARTUP_HINT}")
        self.reason = reason


def agree_on_outage(loader: ColorLoader, unavailable: ShardsUnavailable | None) -> None:
    """EVERY RANK of a loader built with publish_outages=False, at a point every rank reaches before any other
    collective (a training step's start, the end of a validation pass's batches): ShardServerDown on every rank if
    any rank's reads gave up (`unavailable`, caught by the caller). Other loaders: `unavailable` raised as it is."""
    if loader.publish_outages or not loader.remote:
        if unavailable is not None:
            raise unavailable
        return
    if collectives.agree(unavailable is not None)[0]:
        reasons = collectives.all_gather_objects(None if unavailable is None else unavailable.reason)
        raise ShardServerDown(next(reason for reason in reasons if reason))


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`. To a GPU from pinned memory, without waiting: a blocking copy would stall the host
    until the device has run everything queued before it (the step's whole backward)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def build_loader(cfg: DataConfig, split: str, *, batch_size: int, global_batch: int | None = None, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", seed: int = 0, augment: bool | None = None,
                 dtype: torch.dtype = torch.float32, publish_outages: bool = True) -> ColorLoader:
    """The loader of one split on one rank: `batch_size` samples per micro-batch, `global_batch` per optimizer
    step (default: one micro-batch per rank). `augment` (default: for "train" only) shuffles, crops and flips;
    without it the order is the shard order and each image is centre-cropped, as evaluation wants.
    `publish_outages=False`: a server that stops answering (ShardsUnavailable) is only raised on this rank, for a
    caller that has every rank agree on it (the trainer); otherwise it ends every rank at once, as damage does.

    Every shard of the split is checked to be there with the size its manifest records, and every shard index to
    agree with the manifest, before anything is read."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.shards is None:
        raise ValueError("data.shards is not set; make a shard set with `colorize-dist shards synth DIR` "
                         "or `colorize-dist shards make SRC DIR` and set data.shards=DIR")
    device = torch.device(device)
    augment = split == "train" if augment is None else augment
    failure.watch()
    try:
        layout = Layout(global_batch or batch_size * world_size, batch_size, rank, world_size)
        store = open_store(cfg.shards, connections=cfg.reads_in_flight)
        samples = SplitSamples(tuple(list_shards(store, split)))  # an empty split: one line
        if cfg.cache_dir is not None and isinstance(store, RemoteStore):
            store.cache = ShardCache(cfg.cache_dir, samples.shards, max_bytes=int(cfg.cache_max_gb * 2**30))
        reading = BatchReading(samples, store, resolution=cfg.resolution,
                               seed=seed if augment else None, window=cfg.shuffle_buffer,
                               crop_scale=tuple(cfg.crop_scale), flip=cfg.flip,
                               samples_per_read=cfg.samples_per_read)
        source = _source_class(cfg.backend)(reading, layout, cfg, device=device)
    except (ManifestError, MissingShardsError) as exc:
        failure.publish(str(exc))
        raise
    return ColorLoader(source, layout, samples, device=device, dtype=dtype, remote=isinstance(store, RemoteStore),
                       publish_outages=publish_outages)


def first_batch(cfg: DataConfig, split: str, *, batch_size: int, device: torch.device | str = "cpu") -> Batch:
    """The first batch of `split` (e.g. the trainer's fixed sample images), its loader closed at once."""
    with build_loader(cfg, split, batch_size=batch_size, device=device) as loader:
        return next(loader.epoch(0))


def _source_class(backend: str) -> type[Source]:
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
