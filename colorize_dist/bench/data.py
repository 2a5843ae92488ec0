"""Images/s of the DALI pipeline against the reference loader, built once each and fed the same shards and threads.

CPU time per image of the process and its workers is reported beside images/s because it stays meaningful on a busy
machine. --latency serves the shards through nginx behind a delaying proxy (bench/serve.py) to stand in for an
object store's round trip; --resume-at compares starting an epoch at any batch with replaying the consumed batches.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from colorize_dist.data import DataConfig, build_loader, synth
from colorize_dist.data.options import ShardOptions


@dataclass(frozen=True)
class LoaderRun:
    """One loader column: which backend, with how many threads (DALI) or workers (reference), decoding where."""

    title: str
    backend: str
    threads: int
    device: torch.device

    def config(self, shards: str | Path, resolution: int) -> DataConfig:
        return DataConfig(shards=str(shards), resolution=resolution, backend=self.backend, num_threads=self.threads)


def loader_runs(threads: int, *, on_gpu: bool) -> list[LoaderRun]:
    """The reference loader (the baseline of the ratios), DALI on the CPU and, on a GPU, DALI with mixed (GPU)
    decoding; on a GPU the reference loader gets every core, as it would in training there."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    runs = [LoaderRun("reference", "reference", (os.cpu_count() or 1) if on_gpu else threads, gpu if on_gpu else cpu),
            LoaderRun("DALI cpu", "dali", threads, cpu)]
    return [*runs, LoaderRun("DALI mixed", "dali", threads, gpu)] if on_gpu else runs


def synthetic_shards(directory: Path, images: int, resolution: int, *, workers: int | None = None,
                     val_fraction: float = 0.0) -> Path:
    """`images` synthetic JPEG images at `resolution`²; `val_fraction` of them in the val split."""
    return synth.write_synthetic_shards(directory, images, resolution,
                                        options=ShardOptions(val_fraction=val_fraction, workers=workers))


def throughput_table(titles: Sequence[str], rows: Sequence[tuple[int | str, Sequence[tuple[float, float] | None]]],
                     *, tablefmt: str = "simple", baseline: str = "ref") -> str:
    """One row per (resolution or a label, (images/s, CPU ms per image) of each loader): images/s, the ratio of each
    to the first loader's (the reference), CPU ms per image, and the reference's CPU time over each one's. A loader
    that did not run (None) is "–"."""
    names = [title if len(titles) > 2 or index == 0 else title.split()[0] for index, title in enumerate(titles)]
    headers = ["resolution", *titles, *(f"{name}/{baseline}" for name in names[1:]),
               *(f"CPU {name}" for name in names), *(f"CPU {baseline}/{name}" for name in names[1:])]

    def ratio(a: float | None, b: float | None) -> str | None:
        return f"{a / b:.2f}×" if a and b else None

    table = []
    for label, measured in rows:
        rates = [m[0] if m else None for m in measured]
        cpu_ms = [m[1] if m else None for m in measured]
        table.append([label if isinstance(label, str) else f"{label}²", *rates,
                      *(ratio(rate, rates[0]) for rate in rates[1:]), *cpu_ms,
                      *(ratio(cpu_ms[0], ms) for ms in cpu_ms[1:])])
    count = len(titles)
    floatfmt = ["", *[".0f"] * count, *[""] * (count - 1), *[".2f"] * count, *[""] * (count - 1)]
    return tabulate(table, headers, tablefmt=tablefmt, floatfmt=floatfmt, numalign="right", stralign="right",
                    missingval="–")


def throughput(cfg: DataConfig, device: torch.device, *, batch_size: int, epochs: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `epochs` epochs after a warm-up one, from one loader."""
    images = 0
    with build_loader(cfg, "train", batch_size=batch_size, device=device) as loader:
        for epoch in range(epochs + 1):
            if epoch == 1:
                start, cpu_start, images = time.perf_counter(), _cpu_seconds(), 0
            for batch in loader.epoch(epoch):
                images += len(batch.keys)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return images / (time.perf_counter() - start), (_cpu_seconds() - cpu_start) / images * 1e3


def resume_latency(cfg: DataConfig, device: torch.device, *, batch_size: int,
                   fraction: float) -> tuple[int, int, float, float]:
    """(start batch, batches per epoch, seconds to the first batch of epoch 1 resumed at `fraction` of it, seconds
    to reach the same batch by decoding the ones before it), each from a new loader."""
    timings = []
    for replay in (False, True):
        begin = time.perf_counter()
        with build_loader(cfg, "train", batch_size=batch_size, device=device) as loader:
            start_batch = round(fraction * loader.batches_per_epoch)
            batches = loader.epoch(1, 0 if replay else start_batch * batch_size)
            for _ in range(start_batch + 1 if replay else 1):
                next(batches)
            batches.close()
            timings.append(time.perf_counter() - begin)
    return start_batch, loader.batches_per_epoch, timings[0], timings[1]


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the reference loader's workers, joined every epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
