"""The DALI pipeline: one per loader, built once, fed batch by batch; decodes on the CPU or the GPU.

An external source feeds each batch's encoded images (read and checked by `ShardReader`, in the order of
`epoch_order`) and flip flags; DALI decodes and mirrors them, and torch cuts each sample's box (drawn from
the decoded size, see `augment`) and resizes it on the same device. On a GPU the decoder is `mixed` (nvJPEG:
baseline JPEGs on the hardware decoder, a share `hw_decoder_load`, the rest with CUDA; PNG and other formats
decode on the CPU, progressive JPEGs with CUDA). On the CPU, torch's uint8 bilinear resize is several times
faster than DALI's (see BENCHMARKS.md), which is why the resize is not a DALI operator.

The pipeline is built on first use and lives as long as the loader: epochs and validation passes reuse its
decoder state, threads and memory. Its prefetch queue runs ahead from the end of an epoch into the next one
((epoch + 1, 0); validation passes are all alike), so consecutive epochs flow without a pause. Asking for any
other position drops the batches in flight (at most `prefetch`) and feeds from there: resuming at batch k
decodes nothing before it. The order depends on (seed, epoch) only, whatever the pipeline did before.

DALI 2.4's `fn.readers.webdataset` does support checkpointing (`enable_checkpointing=True`; a restored
pipeline replays its reader in a dry run and yields the same samples). It is not used: a DALI checkpoint
restores only at build time, from state saved by that rank's running pipeline, so every rank would have to
write its own DALI state into each training checkpoint, and the reader's shuffle state runs on from epoch to
epoch, so a reused pipeline could not start epoch e as a fresh one would. Feeding the pipeline from
`epoch_order` gives both for nothing: batch k of epoch e is known from (seed, epoch, k) alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import __version__ as dali_version
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

from colorize_dist.data.augment import Augment, mirror_box, resize_box
from colorize_dist.data.config import DataConfig
from colorize_dist.data.manifest import ShardDataError, verify_hint
from colorize_dist.data.reading import ShardReader
from colorize_dist.data.sharding import RankSlice, epoch_order, epoch_seed, locate
from colorize_dist.files import first_line

log = logging.getLogger(__name__)


@pipeline_def(enable_conditionals=False)
def decode_pipeline(feed, *, decode_device: str, hw_decoder_load: float):
    encoded, mirrored = fn.external_source(source=feed, num_outputs=2, batch=True)
    options = {"device": decode_device, "output_type": types.RGB}
    if decode_device == "mixed":
        options["hw_decoder_load"] = hw_decoder_load
    return fn.flip(fn.decoders.image(encoded, **options), horizontal=mirrored)


@dataclass
class Fed:
    """One batch handed to the pipeline: where it is in which epoch, and what the output needs to finish it."""

    epoch: int
    batch: int
    augment: Augment
    keys: list[str]
    shards: list[str]
    mirrored: list[bool]
    draws: list  # per sample: its random numbers (see `augment`), None for validation
    error: str | None  # a sample could not be read: raised when this batch is due


class DaliSource:
    """One rank's batches, `batches(epoch, start_batch)`, from one long-lived pipeline."""

    def __init__(self, ranks: RankSlice, cfg: DataConfig, *, train: bool, seed: int, device: torch.device,
                 directory: Path):
        self.ranks, self.cfg, self.train, self.seed, self.device = ranks, cfg, train, seed, device
        self.directory = directory
        self.reader = ShardReader(ranks.shards, directory)
        self.reader.check_indexes(ranks.shard_indices)  # a bad index is refused now, not mid-epoch
        self.pipe = None
        self.builds = self.dropped = 0  # pipelines built (one), batches fed and then dropped (repositioning)
        self.next_feed = (0, 0)  # (epoch, batch) the next call of the external source feeds
        self.in_flight: deque[Fed] = deque()  # fed, not yet returned by the pipeline, in order
        self._orders: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        if not self.on_gpu:
            return (f"DALI {dali_version}: decoding on the CPU ({self.cfg.num_threads} threads); crop and resize "
                    "in torch")
        return (f"DALI {dali_version}: decoding on {self.device} (mixed: baseline JPEGs on the hardware decoder, "
                f"hw_decoder_load={self.cfg.hw_decoder_load}, the rest with CUDA; PNG on the CPU)")

    def gpu_notes(self) -> list[str]:
        """What keeps this rank's images off the GPU's hardware JPEG decoder (nothing on the CPU)."""
        if not self.on_gpu:
            return []
        tables = [self.reader.table(index) for index in self.ranks.shard_indices]
        png = sum(extension in ("png", "webp") for table in tables for extension in table.extensions)
        progressive = sum(table.shard.progressive for table in tables)
        notes = []
        if png:
            notes.append(f"{png} of this rank's images are PNG or WebP, which DALI decodes on the CPU even with "
                         "`mixed`; remake the shards as JPEG (`colorize-dist shards make --format jpg`) to decode "
                         "on the GPU")
        if progressive:
            notes.append(f"{progressive} of this rank's images are progressive JPEGs, which skip the hardware JPEG "
                         "decoder (CUDA decodes them); remake the shards without --keep-original for baseline JPEGs")
        return notes

    def batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        epoch = epoch if self.train else 0  # validation passes are all alike
        if start_batch >= self.ranks.batches_per_epoch:
            return
        pipe = self._pipeline()
        if not self.in_flight or (self.in_flight[0].epoch, self.in_flight[0].batch) != (epoch, start_batch):
            self.next_feed = (epoch, start_batch)
            for _ in range(len(self.in_flight)):  # drop what was fed for another position
                self._run(pipe, due=False)
                self.dropped += 1
        for batch_index in range(start_batch, self.ranks.batches_per_epoch):
            images, fed = self._run(pipe)
            if (fed.epoch, fed.batch) != (epoch, batch_index):
                raise AssertionError(f"DALI returned batch {fed.batch} of epoch {fed.epoch}, expected "
                                     f"{batch_index} of {epoch}")
            yield self._finish(images, fed), fed.keys

    def close(self) -> None:
        """Release the pipeline (threads, decoder state, memory) and the shard files."""
        self.pipe = None
        self.in_flight.clear()
        self.reader.close()
        gc.collect()  # DALI's pipeline objects hold reference cycles

    # -- feeding

    def _pipeline(self):
        if self.pipe is None:
            self.pipe = decode_pipeline(
                _Feed(self), decode_device="mixed" if self.on_gpu else "cpu",
                hw_decoder_load=self.cfg.hw_decoder_load, batch_size=self.ranks.batch_size,
                num_threads=self.cfg.num_threads, device_id=_cuda_index(self.device) if self.on_gpu else None,
                prefetch_queue_depth=self.cfg.prefetch, seed=0,
            )
            self.pipe.build()
            self.builds += 1
            log.info("%s", self.describe())
            for note in self.gpu_notes():
                log.warning("%s", note)
        return self.pipe

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, shard of each, sample in its shard) of this rank's epoch; the last two epochs are kept."""
        if epoch not in self._orders:
            seed = epoch_seed(self.seed, epoch, self.ranks.rank) if self.train else None
            order = epoch_order(self.ranks, seed, self.cfg.shuffle_buffer)
            self._orders = {key: value for key, value in self._orders.items() if key == epoch - 1}
            self._orders[epoch] = (order, *locate(self.ranks, order))
        return self._orders[epoch]

    def feed(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The external source: the next batch's encoded images and flip flags."""
        epoch, batch_index = self.next_feed
        seed = epoch_seed(self.seed, epoch, self.ranks.rank) if self.train else None
        augment = Augment(self.cfg.resolution, seed, tuple(self.cfg.crop_scale), self.cfg.flip)
        _, shard_of, sample_of = self._order(epoch)
        size = self.ranks.batch_size
        draws = augment.draws(batch_index, size)
        fed = Fed(epoch, batch_index, augment, [], [], [], [], None)
        encoded = []
        for i, position in enumerate(range(batch_index * size, (batch_index + 1) * size)):
            shard_index, sample_index = int(shard_of[position]), int(sample_of[position])
            shard = self.ranks.shards[shard_index]
            try:
                data = self.reader.read(shard_index, sample_index)
            except ShardDataError as exc:  # fed as a placeholder; raised when the batch is due
                data, fed.error = _placeholder(), fed.error or str(exc)
            row = None if draws is None else draws[i]
            fed.keys.append(self.reader.batch_key(shard_index, sample_index))
            fed.shards.append(str(shard.path))
            fed.mirrored.append(augment.mirrored(row))
            fed.draws.append(row)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
        self.in_flight.append(fed)
        last = batch_index + 1 == self.ranks.batches_per_epoch
        self.next_feed = ((epoch + 1 if self.train else 0), 0) if last else (epoch, batch_index + 1)
        return encoded, np.array(fed.mirrored, dtype=np.int32)

    # -- outputs

    def _run(self, pipe, due: bool = True) -> tuple[object, Fed]:
        """The pipeline's next output and the batch it belongs to; decoding errors become one line. A batch
        that is not `due` (dropped) does not raise the read error it carries."""
        try:
            (images,) = pipe.run()
        except RuntimeError as exc:  # a decoder's C++ error: name the shards of the batch that was due
            fed = self.in_flight.popleft() if self.in_flight else None
            shards = ", ".join(sorted(set(fed.shards))) if fed else "this split"
            raise ShardDataError(f"DALI could not decode an image of shard(s) {shards} "
                                 f"({_dali_reason(exc)}); {verify_hint(self.directory)}") from None
        fed = self.in_flight.popleft()
        if due and fed.error is not None:
            raise ShardDataError(fed.error)
        return images, fed

    def _finish(self, images, fed: Fed) -> torch.Tensor:
        """Decoded (and mirrored) images → each sample's box, resized: uint8 (B, res, res, 3) on the device.

        One torch thread: per-sample ops this small gain nothing from OpenMP, whose idle workers would spin
        between them, burning the cores DALI decodes on (6× the CPU time per image, measured)."""
        resolution = self.cfg.resolution
        rgb = torch.empty((len(fed.keys), resolution, resolution, 3), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.on_gpu else None
        with _torch_threads(1):
            for i, (mirrored, draws) in enumerate(zip(fed.mirrored, fed.draws, strict=True)):
                if self.on_gpu:
                    image = torch.empty(images[i].shape(), dtype=torch.uint8, device=self.device)
                    feed_ndarray(images[i], image, stream)
                else:
                    image = torch.from_numpy(np.asarray(images[i]))  # a view, valid until the next run
                height, width = image.shape[:2]
                box = fed.augment.box((width, height), draws)
                rgb[i] = resize_box(image, mirror_box(box, width) if mirrored else box, resolution)
        return rgb


class _Feed:
    """DALI's external source callback; a weak link back to the source would do, but close() breaks the cycle."""

    def __init__(self, source: DaliSource):
        self.source = source

    def __call__(self):
        return self.source.feed()


@functools.cache
def _placeholder() -> bytes:
    """A valid 8×8 JPEG fed in place of a sample that could not be read (its error is raised instead)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _dali_reason(exc: RuntimeError) -> str:
    """The informative line of a DALI error (they run to dozens of lines of C++ context)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        lower = line.lower()
        informative = lower.startswith(("error", "assert")) or "unsupported" in lower or "failed" in lower
        if informative and "Critical error" not in line and "Error in" not in line:
            return first_line(RuntimeError(line))[:200]
    return first_line(exc)[:200]


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
