"""The reference loader: torch DataLoader worker processes decode, crop and resize with PIL.

It produces what the DALI pipeline produces (uint8 NHWC RGB batches, the same samples in the same order on each
rank, the same crop boxes and flips, the same padding) with the same division of work: `BatchReading` reads and
checks each micro-batch's bytes in a thread of its own (`ReadAhead`), and the workers decode, crop, resize and
flip, one micro-batch per task. It is the baseline of `colorize-dist bench data` and the loader used where DALI is
not installed.

Workers ignore SIGTERM and SIGUSR1: Slurm sends them to every process of a job, and the trainer saves a
checkpoint on them, which needs the workers alive until then. So nothing may wait for a worker to obey
SIGTERM (that is how a failed run used to hang at exit): workers die with this process (PR_SET_PDEATHSIG),
an epoch left early stops its workers (a sentinel, then SIGKILL), and at exit any still alive are killed
before `multiprocessing` would wait for them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import io
import os
import signal
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from colorize_dist.data.config import DataConfig
from colorize_dist.data.images import to_rgb8
from colorize_dist.data.manifest import ShardDataError, verify_hint
from colorize_dist.data.reading import BatchReading, EncodedBatch, ReadAhead
from colorize_dist.data.sharding import Layout, micro_batches
from colorize_dist.files import first_line
from colorize_dist.processes import dies_with_parent

WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the job's stop signals, which the trainer handles
_workers: weakref.WeakSet = weakref.WeakSet()  # every worker process started here, to kill at exit


class ReferenceSource:
    """One rank's micro-batches of one epoch; a resumed epoch reads nothing before its start."""

    def __init__(self, reading: BatchReading, layout: Layout, cfg: DataConfig, *, device: torch.device):
        self.reading, self.layout, self.cfg, self.device = reading, layout, cfg, device

    resize_filter = "PIL's BILINEAR (antialiased)"

    def describe(self) -> str:
        return (f"reference loader: PIL decodes, crops and resizes in {self.cfg.num_threads} DataLoader worker "
                "process(es)")

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, EncodedBatch]]:
        plan = micro_batches(self.layout, self.reading.split.total, epoch, start)
        encoded = ReadAhead(self.reading.read, plan, depth=self.cfg.prefetch * self.cfg.num_threads + 1,
                            parallel=self.reading.batches_in_flight(self.layout.micro_batch))
        loader = DataLoader(Decoder(self.reading.store.where), sampler=encoded, batch_size=None,
                            collate_fn=collate, num_workers=self.cfg.num_threads, prefetch_factor=self.cfg.prefetch,
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=functools.partial(_worker_init, parent=os.getpid()))
        # Workers are forked: objects frozen here are never collected in them. Unreachable DALI pipelines (reference
        # cycles a loader left behind) would otherwise be finalised in the child, waiting forever for DALI threads
        # that only exist in this process.
        gc.freeze()
        # Stop signals wait while the workers are forked: a worker takes its parent's blocked set, and one signalled
        # before `_worker_init` ignores them would die of it. This process takes them once the workers run.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            gc.unfreeze()
        _workers.update(getattr(iterator, "_workers", ()))
        try:
            for rgb, batch in iterator:
                if batch.error is not None:
                    raise batch.error
                yield rgb.to(self.device, non_blocking=True), batch
        finally:
            stop_workers(iterator)
            encoded.close()

    def close(self) -> None:
        self.reading.close()


class Decoder(torch.utils.data.Dataset):
    """Runs in the workers: one micro-batch's bytes → RGB → box (see `augment`) → flip → uint8 (B, res, res, 3)."""

    def __init__(self, directory: str):
        self.directory = directory

    def __getitem__(self, batch: EncodedBatch) -> tuple[np.ndarray | None, EncodedBatch]:
        images = []
        for i, (key, shard, data) in enumerate(zip(batch.keys, batch.shards, batch.data, strict=True)):
            if batch.error is not None:
                break
            draws = None if batch.draws is None else batch.draws[i]
            try:
                with Image.open(io.BytesIO(data)) as encoded:
                    image = to_rgb8(ImageOps.exif_transpose(encoded))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                batch.error = ShardDataError(f"shard {shard} is damaged: sample {key} does not decode "
                                             f"({first_line(exc)}); {verify_hint(self.directory)}")
                break
            size = (batch.augment.resolution, batch.augment.resolution)
            image = image.resize(size, Image.Resampling.BILINEAR, box=batch.augment.box(image.size, draws))
            images.append(np.asarray(ImageOps.mirror(image) if batch.augment.mirrored(draws) else image))
        batch.data = []  # the bytes stay here
        return (None if batch.error is not None else np.stack(images)), batch


def collate(item: tuple[np.ndarray | None, EncodedBatch]) -> tuple[torch.Tensor, EncodedBatch]:
    images, batch = item
    return (torch.empty(0, dtype=torch.uint8) if images is None else torch.from_numpy(images)), batch


def _worker_init(worker_id: int, *, parent: int) -> None:
    """Slurm's SIGTERM/SIGUSR1 reach the workers too: the trainer checkpoints on them, which needs the workers
    alive until then (they exit with the trainer, and die with it if it is killed; not on Linux, the exit hook
    below still kills them)."""
    for stop_signal in WORKER_IGNORED_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)  # discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
    dies_with_parent(signal.SIGKILL, parent)()


def stop_workers(iterator) -> None:
    """End a DataLoader iterator's workers now: torch's shutdown (a sentinel, a short join), then SIGKILL for any
    that did not exit; SIGTERM would be ignored."""
    workers = list(getattr(iterator, "_workers", ()))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    _kill(workers)


def _kill(workers) -> None:
    for worker in workers:
        if worker.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=5)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _kill_workers_at_exit() -> None:
    workers = [worker for worker in _workers if worker.is_alive()]
    if workers:
        # torch's SIGCHLD handler would report these deaths as a worker failure (a traceback after the run's line).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _kill(workers)
