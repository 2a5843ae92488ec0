"""Images/s of the DALI pipeline against the reference loader, built once each and fed the same shards and threads.

CPU time per image of the process and its workers is reported beside images/s because it stays meaningful on a busy
machine. --latency serves the shards through nginx behind a delaying proxy (bench/serve.py) to stand in for an
object store's round trip; --resume-at compares starting an epoch at any batch with replaying the consumed batches.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from colorize_dist.bench import serve
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


Measured = tuple[float, float]  # (images/s, CPU ms per image) of one loader


@dataclass(frozen=True)
class ResumeTiming:
    """`resume_latency` of one loader at one resolution."""

    resolution: int
    loader: str
    start_batch: int
    batches: int
    exact_s: float
    replay_s: float


@dataclass(frozen=True)
class LoaderTimings:
    """What `time_loaders` measured: the loaders, a row per resolution (for `throughput_table`), the resumes."""

    runs: list[LoaderRun]
    rows: list[tuple[int, list[Measured]]]
    resumes: list[ResumeTiming]


def time_loaders(runs: Sequence[LoaderRun], resolutions: Sequence[int], *, shards: Path | None, images: int,
                 threads: int, batch_size: int, epochs: int, resume_at: float | None = None) -> LoaderTimings:
    """`throughput` of each loader at each resolution, on `shards` or on `images` synthetic images per resolution
    (written with `threads` workers to a temporary folder); with `resume_at`, also each one's `resume_latency`."""
    rows, resumes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        for resolution in resolutions:
            located = shards or synthetic_shards(Path(scratch) / str(resolution), images, resolution, workers=threads)
            configs = [run.config(located, resolution) for run in runs]
            rows.append((resolution, [throughput(cfg, run.device, batch_size=batch_size, epochs=epochs)
                                      for cfg, run in zip(configs, runs, strict=True)]))
            if resume_at is not None:
                resumes += [ResumeTiming(resolution, run.title, *resume_latency(cfg, run.device, batch_size=batch_size,
                                                                                fraction=resume_at))
                            for cfg, run in zip(configs, runs, strict=True)]
    return LoaderTimings(runs=list(runs), rows=rows, resumes=resumes)


def time_remote_reads(resolutions: Sequence[int], *, shards: Path | None, images: int, threads: int, batch_size: int,
                      epochs: int, latencies_ms: Sequence[float], url: str | None, cache: bool, reads_in_flight: int,
                      samples_per_read: Sequence[int]) -> tuple[list[str], list[tuple[int | str, list[Measured]]]]:
    """Column titles and rows (for `throughput_table`, baseline "disk") of DALI on the CPU reading from disk,
    through nginx behind a proxy delaying each response by each of `latencies_ms` (also through a node cache
    filled by the warm-up with `cache`), and from `url`; a row per resolution and data.samples_per_read."""
    titles = ["disk", *(f"HTTP {ms:g} ms{suffix}" for ms in latencies_ms for suffix in ["", *([" cached"] * cache)]),
              *(["--url"] if url else [])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        for resolution in resolutions:
            located = shards or synthetic_shards(Path(scratch) / str(resolution), images, resolution, workers=threads)
            server = serve.Nginx(Path(located).resolve(), Path(scratch) / f"nginx-{resolution}").start() \
                if latencies_ms else None
            try:
                for per_read in samples_per_read:

                    def rate(location: str, resolution=resolution, per_read=per_read,
                             cache_dir: Path | None = None) -> Measured:
                        cfg = DataConfig(shards=location, resolution=resolution, backend="dali", num_threads=threads,
                                         reads_in_flight=reads_in_flight, samples_per_read=per_read,
                                         cache_dir=None if cache_dir is None else str(cache_dir))
                        return throughput(cfg, torch.device("cpu"), batch_size=batch_size, epochs=epochs)

                    measured = [rate(str(located))]
                    for ms in latencies_ms:
                        proxy = serve.Proxy(server.port, delay_s=ms / 1e3).start()
                        try:
                            measured.append(rate(proxy.url))
                            if cache:
                                measured.append(rate(proxy.url, cache_dir=Path(scratch) /
                                                     f"cache-{resolution}-{per_read}-{ms}"))
                        finally:
                            proxy.stop()
                    if url:
                        measured.append(rate(url))
                    rows.append((f"{resolution}² {per_read}/read" if len(samples_per_read) > 1 else resolution,
                                 measured))
            finally:
                if server is not None:
                    server.stop()
    return titles, rows


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
