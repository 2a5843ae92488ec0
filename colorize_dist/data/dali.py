"""The DALI pipeline: one graph per loader, built once, fed micro-batch by micro-batch; decodes on the CPU or the GPU.

The graph (`crop_pipeline`) takes each sample's encoded bytes, its crop window and its flip as inputs, so the
augmentations stay ours — drawn from (seed, epoch, slot), the same in both loaders and for any number of ranks
(see `augment`, `sharding`) — while the work is DALI's:

    encoded bytes, window, flip ──► decoders.image_slice ──► resize to resolution² ──► flip ──► uint8 (B, H, W, 3)

On a GPU every operator runs on the device (`mixed` decoding: nvJPEG, baseline JPEGs on the hardware decoder, a
share `hw_decoder_load`, the rest with CUDA; PNG and WebP decode on the CPU, then go to the device). The output
is one dense batch, handed to torch through DLPack without a copy, so our RGB→Lab kernel reads it where DALI wrote
it. Both ends of that buffer's life are ordered on the device, never by waiting on the host: the pipeline runs with
torch's current stream as its output stream (DALI makes that stream wait for the batch), and the loader holds the
batch (`loader.DeviceHold`) until an event recorded after the kernel that reads it has passed, since dropping a
DLPack view gives the memory back to DALI's pool with no ordering against work still queued on torch's stream. On
the CPU the same graph stops before the resize: torch's uint8 bilinear resize of the crops is
faster than DALI's CPU resize (BENCHMARKS.md), so `resize_in_dali` defaults to the device.

Every decoder upsamples JPEG chroma as libjpeg-turbo does ("fancy" upsampling: DALI's CPU decoder and PIL by
default, nvJPEG with `jpeg_fancy_upsampling`), so the ab targets do not depend on where an image was decoded: DALI's
CPU windows of 4:2:0 photos equal PIL's pixels exactly (tests/data/test_decode.py); `mixed` is checked for the
argument only, without a GPU.

Region-of-interest decoding: DALI 2.4's `decoders.image_slice` (nvImageCodec) "uses the ROI decoding when
possible", on the CPU and with `mixed`, where baseline JPEGs go to the hardware decoder when there is one; what it
saves at our crops (80–100 % of the image) is in BENCHMARKS.md. The window is the same either way.
Windows are in the image's displayed orientation (DALI applies EXIF rotation, as the reference loader does),
computed from its header before decoding (tested with EXIF-rotated JPEGs).

The encoded bytes are read and checked by `BatchReading` in a read-ahead thread (`ReadAhead`), which also reads
each image's size from its header (once per image) to place the window; the pipeline's external source only
takes finished batches from it. The pipeline lives as long as the loader: epochs and validation passes reuse its
decoder state, threads and memory, and its prefetch queue runs on from the end of an epoch into the next one.
Asking for any other position drops the batches in flight (at most `prefetch`) and feeds from there: resuming at
sample s decodes nothing before it.

DALI's own readers and their checkpointing are not used: the samples of epoch e from sample s on are known from
(seed, e, s) alone, for any number of ranks, which a DALI reader's state (saved per rank, restored only at build
time) cannot give.
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

import numpy as np
import torch
from nvidia.dali import __version__ as dali_version
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from colorize_dist.data.augment import resize_crop
from colorize_dist.data.config import DataConfig
from colorize_dist.data.manifest import ShardDataError, verify_hint
from colorize_dist.data.reading import BatchReading, EncodedBatch, ReadAhead
from colorize_dist.data.sharding import Layout, MicroSlots, micro_batches
from colorize_dist.files import first_line

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@pipeline_def(enable_conditionals=False)
def crop_pipeline(feed, *, decode_device: str, hw_decoder_load: float, resize_to: int | None):
    """Decode each sample's window, resize it to `resize_to`² (None: leave it), flip it where asked."""
    encoded, anchors, shapes, mirrored = fn.external_source(source=feed, num_outputs=4, batch=True)
    # jpeg_fancy_upsampling: nvJPEG's own chroma upsampling differs from libjpeg-turbo's (DALI's CPU decoder, PIL),
    # and the ab targets are exactly what chroma upsampling changes; with it, `mixed` upsamples as they do.
    options = {"device": decode_device, "output_type": types.RGB, "jpeg_fancy_upsampling": True}
    if decode_device == "mixed":
        options["hw_decoder_load"] = hw_decoder_load
    images = fn.decoders.image_slice(encoded, anchors, shapes, axis_names="WH", normalized_anchor=False,
                                     normalized_shape=False, **options)
    if resize_to is not None:
        images = fn.resize(images, size=[resize_to, resize_to], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.flip(images, horizontal=mirrored)


@dataclass
class Prepared:
    """One micro-batch as the graph takes it: the read batch plus each sample's bytes, window and flip."""

    batch: EncodedBatch
    encoded: list[np.ndarray]
    anchors: np.ndarray  # (B, 2) int32: left, top
    shapes: np.ndarray  # (B, 2) int32: width, height
    mirrored: np.ndarray  # (B,) int32


class DaliSource:
    """One rank's micro-batches, `batches(epoch, start)`, from one long-lived pipeline."""

    def __init__(self, reading: BatchReading, layout: Layout, cfg: DataConfig, *, device: torch.device,
                 resize_in_dali: bool | None = None):
        self.reading, self.layout, self.cfg, self.device = reading, layout, cfg, device
        self.resize_in_dali = self.on_gpu if resize_in_dali is None else resize_in_dali
        if self.on_gpu and not self.resize_in_dali:
            raise ValueError("on a GPU the DALI graph resizes on the device (resize_in_dali must be True or None)")
        self.train = reading.seed is not None
        self.pipe = None
        self.builds = self.dropped = 0  # pipelines built (one), micro-batches fed and then dropped (repositioning)
        self.stream: ReadAhead[Prepared] | None = None  # prepared micro-batches, in the order they are fed
        self.in_flight: deque[Prepared] = deque()  # fed, not yet returned by the pipeline, in order
        # Each image's displayed (width, height), read from its header once (0: not yet): the windows need it, and
        # parsing headers again every epoch costs as much CPU as the reads themselves.
        self.sizes = np.zeros((reading.split.total, 2), dtype=np.int32)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def resize_filter(self) -> str:
        return ("DALI's antialiased linear resize" if self.resize_in_dali
                else "torch's antialiased bilinear interpolate")

    def describe(self) -> str:
        resize = "DALI" if self.resize_in_dali else "torch"
        if not self.on_gpu:
            return (f"DALI {dali_version}: decoding crop windows on the CPU ({self.cfg.num_threads} threads), "
                    f"resize in {resize}")
        return (f"DALI {dali_version}: decoding crop windows on {self.device} (mixed: baseline JPEGs on the hardware "
                f"decoder, hw_decoder_load={self.cfg.hw_decoder_load}, the rest with CUDA; PNG on the CPU), resize "
                f"and flip on the device")

    def gpu_notes(self) -> list[str]:
        """What keeps this split's images off the GPU's hardware JPEG decoder (nothing on the CPU)."""
        if not self.on_gpu:
            return []
        tables = [self.reading.reader.table(index) for index in range(len(self.reading.split.shards))]
        png = sum(extension in ("png", "webp") for table in tables for extension in table.extensions)
        progressive = sum(table.shard.progressive for table in tables)
        notes = []
        if png:
            notes.append(f"{png} of this split's images are PNG or WebP, which DALI decodes on the CPU even with "
                         "`mixed`; remake the shards as JPEG (`colorize-dist shards make --format jpg`) to decode "
                         "on the GPU")
        if progressive:
            notes.append(f"{progressive} of this split's images are progressive JPEGs, which skip the hardware JPEG "
                         "decoder (CUDA decodes them); remake the shards without --keep-original for baseline JPEGs")
        return notes

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, EncodedBatch]]:
        epoch = epoch if self.train else 0  # validation passes are all alike
        expected = micro_batches(self.layout, self.reading.split.total, epoch, start)
        first = next(expected, None)
        if first is None:
            return
        pipe = self._pipeline()
        if self.stream is None or not (self.in_flight and _same(self.in_flight[0].batch.slots, first)):
            self._reposition(pipe, epoch, start)
        for slots in (first, *expected):
            images, prepared = self._run(pipe)
            if not _same(prepared.batch.slots, slots):
                raise AssertionError(f"DALI returned micro-batch {prepared.batch.slots.step_start}+"
                                     f"{prepared.batch.slots.index} of epoch {prepared.batch.slots.epoch}, expected "
                                     f"{slots.step_start}+{slots.index} of {slots.epoch}")
            yield self._finish(images), prepared.batch

    def close(self) -> None:
        """Release the pipeline (threads, decoder state, memory), the read-ahead thread and the shard files."""
        if self.stream is not None:
            self.stream.close()
        self.pipe, self.stream = None, None
        self.in_flight.clear()
        self.reading.close()
        gc.collect()  # DALI's pipeline objects hold reference cycles

    # -- feeding

    def graph(self):
        """The pipeline as defined for this device, not yet built (building a `mixed` graph needs the GPU)."""
        return crop_pipeline(
            _Feed(self), decode_device="mixed" if self.on_gpu else "cpu",
            hw_decoder_load=self.cfg.hw_decoder_load,
            resize_to=self.cfg.resolution if self.resize_in_dali else None,
            batch_size=self.layout.micro_batch, num_threads=self.cfg.num_threads,
            device_id=_cuda_index(self.device) if self.on_gpu else None,
            prefetch_queue_depth=self.cfg.prefetch, seed=0,
        )

    def _pipeline(self):
        if self.pipe is None:
            self.pipe = self.graph()
            self.builds += 1
            self.pipe.build()
            log.info("%s", self.describe())
            for note in self.gpu_notes():
                log.warning("%s", note)
        return self.pipe

    def _reposition(self, pipe, epoch: int, start: int) -> None:
        """Feed from (epoch, start) on; the batches in flight are run through the pipeline and dropped."""
        if self.stream is not None:
            self.stream.close()
        self.stream = ReadAhead(self._prepare, self._plan(epoch, start), depth=self.cfg.prefetch + 1,
                                parallel=self.reading.batches_in_flight(self.layout.micro_batch))
        for _ in range(len(self.in_flight)):
            self._run(pipe, due=False)
            self.dropped += 1

    def _plan(self, epoch: int, start: int) -> Iterator[MicroSlots]:
        """Micro-batches from (epoch, start) on, epoch after epoch (validation: pass after pass)."""
        while True:
            yield from micro_batches(self.layout, self.reading.split.total, epoch, start)
            epoch, start = (epoch + 1 if self.train else epoch), 0

    def _prepare(self, slots: MicroSlots) -> Prepared:
        """Runs in the read-ahead thread: the micro-batch's checked bytes, and each sample's window and flip."""
        batch = self.reading.read(slots)
        encoded, anchors, shapes, mirrored = [], [], [], []
        for i, (data, key, shard) in enumerate(zip(batch.data, batch.keys, batch.shards, strict=True)):
            draws = None if batch.draws is None else batch.draws[i]
            known, size = self.sizes[batch.positions[i]], None
            if data is not None and known[0]:
                size = (int(known[0]), int(known[1]))
            elif data is not None:
                try:
                    size = known[:] = _oriented_size(data)
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    batch.error = batch.error or ShardDataError(
                        f"shard {shard} is damaged: sample {key} does not decode ({first_line(exc)}); "
                        f"{verify_hint(self.reading.store.where)}")
            if size is None:  # fed as a placeholder; its error is raised when the batch is due
                data, size = _placeholder(), (8, 8)
            left, top, right, bottom = batch.augment.box(size, draws)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            anchors.append((left, top))
            shapes.append((right - left, bottom - top))
            mirrored.append(batch.augment.mirrored(draws))
        return Prepared(batch, encoded, np.array(anchors, dtype=np.int32), np.array(shapes, dtype=np.int32),
                        np.array(mirrored, dtype=np.int32))

    def feed(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """The external source: the next prepared micro-batch (already read, on the read-ahead thread)."""
        prepared = next(self.stream)
        self.in_flight.append(prepared)
        return prepared.encoded, prepared.anchors, prepared.shapes, prepared.mirrored

    # -- outputs

    def _run(self, pipe, due: bool = True) -> tuple[object, Prepared]:
        """The pipeline's next output and the batch it belongs to; decoding errors become one line. A batch
        that is not `due` (dropped) does not raise the read error it carries."""
        try:
            (images,) = pipe.run(torch.cuda.current_stream(self.device)) if self.on_gpu else pipe.run()
        except RuntimeError as exc:  # a decoder's C++ error: name the shards of the batch that was due
            prepared = self.in_flight.popleft() if self.in_flight else None
            shards = ", ".join(sorted(set(prepared.batch.shards))) if prepared else "this split"
            raise ShardDataError(f"DALI could not decode an image of shard(s) {shards} "
                                 f"({_dali_reason(exc)}); {verify_hint(self.reading.store.where)}") from None
        prepared = self.in_flight.popleft()
        if due and prepared.batch.error is not None:
            raise prepared.batch.error
        return images, prepared

    def _finish(self, images) -> torch.Tensor:
        """The pipeline's output → uint8 (B, res, res, 3) on the device.

        Resized in DALI: the dense batch itself, through DLPack. Otherwise each crop is resized by torch, with one
        torch thread: per-sample ops this small gain nothing from OpenMP, whose idle workers would spin between
        them, burning the cores DALI decodes on (BENCHMARKS.md, data loading)."""
        if self.resize_in_dali:
            return torch.from_dlpack(images.as_tensor())
        resolution = self.cfg.resolution
        rgb = torch.empty((len(images), resolution, resolution, 3), dtype=torch.uint8)
        with _torch_threads(1):
            for i in range(len(images)):
                rgb[i] = resize_crop(torch.from_numpy(np.asarray(images[i])), resolution)
        return rgb.to(self.device, non_blocking=True)


class _Feed:
    """DALI's external source callback; a weak link back to the source would do, but close() breaks the cycle."""

    def __init__(self, source: DaliSource):
        self.source = source

    def __call__(self):
        return self.source.feed()


def _same(a: MicroSlots, b: MicroSlots) -> bool:
    return (a.epoch, a.step_start, a.index) == (b.epoch, b.step_start, b.index)


def _oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image as displayed (EXIF rotation applied), from its header alone."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSED_ORIENTATIONS:
            return height, width
    return width, height


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
