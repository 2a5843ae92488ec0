"""The reference loader: the `webdataset` library reads the shards, torch DataLoader workers decode with PIL.

It produces what the DALI pipeline produces (uint8 NHWC RGB batches and sample keys, the same samples
on each rank, the same padding) with the same division of work: this process reads the tars in
order and shuffles the encoded samples, the workers decode and crop them. It is the baseline of
`colorize-dist bench data` and the loader used where DALI is not installed.
"""

from __future__ import annotations

import io
import itertools
import math
import signal
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from colorize_dist.data.config import ASPECT_RATIO_RANGE, DataConfig
from colorize_dist.data.sharding import RankSlice, epoch_seed
from colorize_dist.data.shards import batch_key, image_extension

CROP_ATTEMPTS = 10  # then the whole image, as DALI's random crop does

# One encoded sample on its way to a worker: (position in this rank's epoch, key, image bytes).
EncodedSample = tuple[int, str, bytes]


class ReferenceSource:
    """One rank's batches of one epoch. Resuming skips the consumed batches before decoding them."""

    def __init__(self, ranks: RankSlice, cfg: DataConfig, *, train: bool, seed: int, device: torch.device):
        self.ranks, self.cfg, self.train, self.seed, self.device = ranks, cfg, train, seed, device

    def batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        seed = epoch_seed(self.seed, epoch, self.ranks.rank)
        decoder = Decoder(self.cfg.resolution, train=self.train, crop_scale=tuple(self.cfg.crop_scale),
                          flip=self.cfg.flip, seed=seed)
        loader = DataLoader(
            decoder, batch_sampler=self._encoded_batches(seed, start_batch), collate_fn=collate,
            num_workers=self.cfg.num_threads, prefetch_factor=self.cfg.prefetch,
            pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_stop_signals,
        )
        for rgb, keys in loader:
            yield rgb.to(self.device, non_blocking=True), keys

    def _encoded_batches(self, seed: int, start_batch: int) -> Iterator[list[EncodedSample]]:
        """This rank's range of the split, shuffled (training), padded with copies of the last sample."""
        samples = self._rank_samples()
        if self.train:
            buffer = self.cfg.shuffle_buffer
            samples = wds.shuffle(bufsize=buffer, initial=buffer, seed=seed)(samples)
        padded = _padded(samples, self.ranks.batches_per_epoch * self.ranks.batch_size)
        for batch_index in range(self.ranks.batches_per_epoch):
            batch = list(itertools.islice(padded, self.ranks.batch_size))
            if batch_index >= start_batch:
                yield batch

    def _rank_samples(self) -> Iterator[tuple[str, bytes]]:
        """(key, image bytes) of samples [start, stop) of the split, reading only the tars holding them."""
        urls, first, seen = [], None, 0
        for shard in self.ranks.shards:
            if seen + shard.samples > self.ranks.start and seen < self.ranks.stop:
                first = seen if first is None else first
                urls.append(str(shard.path))
            seen += shard.samples
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
        images = (
            (batch_key(sample["__url__"], sample["__key__"]), sample[next(filter(image_extension, sample))])
            for sample in pipeline if any(map(image_extension, sample))
        )
        offset = self.ranks.start - first
        return itertools.islice(images, offset, offset + self.ranks.stop - self.ranks.start)


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm sends SIGTERM to every process of a job; the trainer saves a checkpoint on it, which needs the
    workers alive until then (they exit with the trainer)."""
    for stop_signal in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)


def _padded(samples: Iterator[tuple[str, bytes]], size: int) -> Iterator[EncodedSample]:
    """`size` samples with their positions: those given, then copies of the last one."""
    last = None
    for position in range(size):
        last = next(samples, last)
        yield (position, *last)


class Decoder(torch.utils.data.Dataset):
    """Runs in the workers: bytes → RGB → crop (random for training, center for validation) → uint8 HWC."""

    def __init__(self, resolution: int, *, train: bool, crop_scale: tuple[float, float], flip: bool, seed: int):
        self.resolution, self.train, self.crop_scale, self.flip, self.seed = resolution, train, crop_scale, flip, seed

    def __getitem__(self, sample: EncodedSample) -> tuple[str, np.ndarray]:
        position, key, data = sample
        with Image.open(io.BytesIO(data)) as encoded:
            image = ImageOps.exif_transpose(encoded).convert("RGB")
        size = (self.resolution, self.resolution)
        if not self.train:
            return key, np.asarray(ImageOps.fit(image, size, method=Image.Resampling.BILINEAR))
        rng = np.random.default_rng([self.seed, position])  # augmentation fixed by (epoch seed, position)
        image = image.resize(size, Image.Resampling.BILINEAR, box=random_crop_box(image.size, self.crop_scale, rng))
        if self.flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return key, np.asarray(image)


def random_crop_box(size: tuple[int, int], scale: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering a random share `scale` of the image with an aspect ratio in ASPECT_RATIO_RANGE."""
    width, height = size
    log_ratios = np.log(ASPECT_RATIO_RANGE)
    for _ in range(CROP_ATTEMPTS):
        area = width * height * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratios))
        crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return left, top, left + crop_width, top + crop_height
    return 0, 0, width, height


def collate(samples: list[tuple[str, np.ndarray]]) -> tuple[torch.Tensor, list[str]]:
    keys, images = zip(*samples, strict=True)
    return torch.from_numpy(np.stack(images)), list(keys)
