"""The reference loader: torch DataLoader worker processes decode, crop and resize with PIL.

It produces what the DALI pipeline produces (uint8 NHWC RGB batches and sample keys, the same samples in
the same order on each rank, the same crop boxes and flips, the same padding) with the same division of
work: this process reads each sample's bytes through the checked `ShardReader` in the order of
`epoch_order`, and the workers decode, crop, resize and flip. It is the baseline of `colorize-dist bench
data` and the loader used where DALI is not installed.

Workers ignore SIGTERM and SIGUSR1: Slurm sends them to every process of a job, and the trainer saves a
checkpoint on them, which needs the workers alive until then. So nothing may wait for a worker to obey
SIGTERM (that is how a failed run used to hang at exit): workers die with this process (PR_SET_PDEATHSIG),
an epoch left early stops its workers (a sentinel, then SIGKILL), and at exit any still alive are killed
before `multiprocessing` would wait for them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import io
import os
import signal
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from colorize_dist.data.augment import Augment
from colorize_dist.data.config import DataConfig
from colorize_dist.data.images import to_rgb8
from colorize_dist.data.manifest import ShardDataError, verify_hint
from colorize_dist.data.reading import ShardReader
from colorize_dist.data.sharding import RankSlice, epoch_order, epoch_seed, locate
from colorize_dist.files import first_line

PR_SET_PDEATHSIG = 1
# One sample on its way to a worker: (its random numbers (see `augment`) or None, batch key, shard path, image
# bytes or None, the read error if the bytes could not be read).
EncodedSample = tuple[np.ndarray | None, str, str, bytes | None, str | None]

WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the job's stop signals, which the trainer handles
_workers: weakref.WeakSet = weakref.WeakSet()  # every worker process started here, to kill at exit


class ReferenceSource:
    """One rank's batches of one epoch; a resumed epoch reads nothing before its first batch."""

    def __init__(self, ranks: RankSlice, cfg: DataConfig, *, train: bool, seed: int, device: torch.device,
                 directory: Path):
        self.ranks, self.cfg, self.train, self.seed, self.device = ranks, cfg, train, seed, device
        self.directory = directory
        self.reader = ShardReader(ranks.shards, directory)
        self.reader.check_indexes(ranks.shard_indices)  # a bad index is refused now, not mid-epoch

    def describe(self) -> str:
        return (f"reference loader: PIL decodes, crops and resizes in {self.cfg.num_threads} DataLoader worker "
                "process(es)")

    def batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        seed = epoch_seed(self.seed, epoch, self.ranks.rank) if self.train else None
        augment = Augment(self.cfg.resolution, seed, tuple(self.cfg.crop_scale), self.cfg.flip)
        order = epoch_order(self.ranks, seed, self.cfg.shuffle_buffer)
        loader = DataLoader(
            Decoder(augment, str(self.directory)), batch_sampler=self._encoded_batches(order, augment, start_batch),
            collate_fn=collate, num_workers=self.cfg.num_threads, prefetch_factor=self.cfg.prefetch,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
        )
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
            for rgb, keys, errors in iterator:
                if errors:
                    raise ShardDataError(errors[0])
                yield rgb.to(self.device, non_blocking=True), keys
        finally:
            stop_workers(iterator)

    def _encoded_batches(self, order: np.ndarray, augment: Augment,
                         start_batch: int) -> Iterator[list[EncodedSample]]:
        """Batches start_batch... of the epoch's order; a sample that cannot be read travels as its error, so
        that it surfaces with its batch (the DataLoader reads ahead)."""
        batch_size = self.ranks.batch_size
        shard_of, sample_of = locate(self.ranks, order)
        for batch_index in range(start_batch, self.ranks.batches_per_epoch):
            draws = augment.draws(batch_index, batch_size)
            batch = []
            for i, position in enumerate(range(batch_index * batch_size, (batch_index + 1) * batch_size)):
                shard_index, sample_index = int(shard_of[position]), int(sample_of[position])
                shard = self.ranks.shards[shard_index]
                key = self.reader.batch_key(shard_index, sample_index)
                row = None if draws is None else draws[i]
                try:
                    batch.append((row, key, str(shard.path), self.reader.read(shard_index, sample_index), None))
                except ShardDataError as exc:
                    batch.append((row, key, str(shard.path), None, str(exc)))
            yield batch

    def close(self) -> None:
        self.reader.close()


class Decoder(torch.utils.data.Dataset):
    """Runs in the workers: bytes → RGB → flip and box (see `augment`) → uint8 (resolution, resolution, 3)."""

    def __init__(self, augment: Augment, directory: str):
        self.augment, self.directory = augment, directory

    def __getitem__(self, sample: EncodedSample) -> tuple[str, np.ndarray | None, str | None]:
        draws, key, shard, data, error = sample
        if error is not None:
            return key, None, error
        try:
            with Image.open(io.BytesIO(data)) as encoded:
                image = to_rgb8(ImageOps.exif_transpose(encoded))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return key, None, (f"shard {shard} is damaged: sample {key} does not decode ({first_line(exc)}); "
                               f"{verify_hint(Path(self.directory))}")
        size = (self.augment.resolution, self.augment.resolution)
        image = image.resize(size, Image.Resampling.BILINEAR, box=self.augment.box(image.size, draws))
        if self.augment.mirrored(draws):
            image = ImageOps.mirror(image)
        return key, np.asarray(image), None


def collate(samples: list[tuple[str, np.ndarray | None, str | None]]) -> tuple[torch.Tensor, list[str], list[str]]:
    keys = [key for key, _, _ in samples]
    errors = [error for _, _, error in samples if error is not None]
    if errors:
        return torch.empty(0, dtype=torch.uint8), keys, errors
    return torch.from_numpy(np.stack([image for _, image, _ in samples])), keys, errors


def _worker_init(worker_id: int) -> None:
    """Slurm's SIGTERM/SIGUSR1 reach the workers too: the trainer checkpoints on them, which needs the workers
    alive until then (they exit with the trainer, and die with it if it is killed)."""
    for stop_signal in WORKER_IGNORED_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)  # discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the exit hook below still kills them
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


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
