"""Images/s of the DALI pipeline against the reference loader, built once each and fed the same shards and threads.

CPU time per image of the process and its workers is reported beside images/s because it stays meaningful on a busy
machine. --latency serves the shards through nginx behind a delaying proxy (bench/serve.py) to stand in for an
object store's round trip; --resume-at compares starting an epoch at any batch with replaying the consumed batches.
"""

from __future__ import annotations

import argparse
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
from colorize_dist.data.loader import dali_available
from colorize_dist.data.make import ShardOptions
from colorize_dist.errors import UserError

DESCRIPTION = """\
Time the training data loaders: the DALI pipeline against the reference loader, on the same shards and threads,
one warm-up epoch then --epochs timed ones. Prints images/s and CPU time per image, with ratios against the
reference loader. Without --shards, synthetic JPEG shards are written to a temporary folder at each resolution.
On a GPU the table adds DALI with GPU decoding.

--latency MS... times reading the same shards from disk and over HTTP with MS milliseconds of delay per response
(--url URL: a shard set already served there), with --samples-per-read N... a line per data.samples_per_read;
--resume-at F also times resuming an epoch at fraction F.

  colorize-dist bench data
  colorize-dist bench data --shards data/shards --latency 0 20
"""  # `colorize-dist bench data --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, help="shard set to read at every resolution (default: synthetic)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512],
                        help="image sides to time (default 128 256 512)")
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI threads, and the reference loader's workers (every core on a GPU)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images per resolution")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one")
    parser.add_argument("--latency", type=float, nargs="+", metavar="MS",
                        help="time reading from disk and over HTTP with these round trips, e.g. 0 20 50")
    parser.add_argument("--url", help="also time reading this served copy of the shards (with --latency or alone)")
    parser.add_argument("--cache", action="store_true",
                        help="also time each --latency through a node cache (data.cache_dir) filled by the warm-up")
    parser.add_argument("--reads-in-flight", type=int, default=DataConfig.reads_in_flight,
                        help="data.reads_in_flight for the HTTP columns")
    parser.add_argument("--samples-per-read", type=int, nargs="+", metavar="N", default=[DataConfig.samples_per_read],
                        help="data.samples_per_read of disk and the HTTP columns, one line each, e.g. 1 4 8 16")
    parser.add_argument("--resume-at", type=float, metavar="F",
                        help="also time resuming epoch 1 at this fraction of it (0 < F < 1), e.g. 0.5")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1 or min(args.resolutions) < 1:
        raise UserError("--epochs and --resolutions must be at least 1", exit_status=1)
    if args.resume_at is not None and not 0.0 < args.resume_at < 1.0:
        raise UserError("--resume-at must be between 0 and 1", exit_status=1)
    if not dali_available():
        raise UserError("nvidia.dali is not installed; pip install 'colorize-dist[dali]'", exit_status=1)
    if args.latency is not None or args.url is not None:
        return remote_main(args)
    runs = loader_runs(args.threads, on_gpu=torch.cuda.is_available())
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        rows, resumes = [], []
        for resolution in args.resolutions:
            shards = args.shards or synthetic_shards(Path(scratch) / str(resolution), args.images, resolution,
                                                     workers=args.threads)
            configs = [run.config(shards, resolution) for run in runs]
            rows.append((resolution, [throughput(cfg, run.device, batch_size=args.batch_size, epochs=args.epochs)
                                      for cfg, run in zip(configs, runs, strict=True)]))
            if args.resume_at is not None:
                resumes += [[f"{resolution}²", run.title, *resume_latency(cfg, run.device, batch_size=args.batch_size,
                                                                          fraction=args.resume_at)]
                            for cfg, run in zip(configs, runs, strict=True)]
    print(f"images/s and CPU ms per image, batch {args.batch_size}, {args.threads} DALI threads, "
          f"{runs[0].threads} reference workers, device {runs[-1].device}, {os.cpu_count()} cores")
    print(throughput_table([run.title for run in runs], rows))
    if resumes:
        print(f"\nresuming epoch 1 at {args.resume_at:g} of it: seconds from a new loader to its first batch")
        print(tabulate([[res, title, f"{start}/{batches}", exact, replay]
                        for res, title, start, batches, exact, replay in resumes],
                       ["resolution", "loader", "batch", "exact start", "replay"], floatfmt=".3f",
                       numalign="right", stralign="right"))
    return 0


def remote_main(args: argparse.Namespace) -> int:
    """Images/s of DALI on the CPU from disk, over HTTP at each --latency, and from --url, side by side."""
    if args.latency is not None and not os.path.exists(serve.NGINX):
        raise UserError("--latency serves the shards with nginx, which is not installed (apt-get install -y nginx)",
                        exit_status=1)
    latencies = args.latency or []
    titles = ["disk", *(f"HTTP {ms:g} ms{suffix}" for ms in latencies for suffix in ["", *([" cached"] * args.cache)]),
              *(["--url"] if args.url else [])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        for resolution in args.resolutions:
            shards = args.shards or synthetic_shards(Path(scratch) / str(resolution), args.images, resolution,
                                                     workers=args.threads)
            server = serve.Nginx(Path(shards).resolve(), Path(scratch) / f"nginx-{resolution}").start() \
                if latencies else None
            try:
                for per_read in args.samples_per_read:

                    def rate(location: str, resolution=resolution, per_read=per_read,
                             cache_dir: Path | None = None) -> tuple[float, float]:
                        cfg = DataConfig(shards=location, resolution=resolution, backend="dali",
                                         num_threads=args.threads, reads_in_flight=args.reads_in_flight,
                                         samples_per_read=per_read,
                                         cache_dir=None if cache_dir is None else str(cache_dir))
                        return throughput(cfg, torch.device("cpu"), batch_size=args.batch_size, epochs=args.epochs)

                    measured = [rate(str(shards))]
                    for ms in latencies:
                        proxy = serve.Proxy(server.port, delay_s=ms / 1e3).start()
                        try:
                            measured.append(rate(proxy.url))
                            if args.cache:
                                measured.append(rate(proxy.url, cache_dir=Path(scratch) /
                                                     f"cache-{resolution}-{per_read}-{ms}"))
                        finally:
                            proxy.stop()
                    if args.url:
                        measured.append(rate(args.url))
                    rows.append((f"{resolution}² {per_read}/read" if len(args.samples_per_read) > 1
                                 else resolution, measured))
            finally:
                if server is not None:
                    server.stop()
    print(f"images/s and CPU ms per image of DALI on the CPU, batch {args.batch_size}, {args.threads} threads, "
          f"data.reads_in_flight={args.reads_in_flight}, data.samples_per_read="
          f"{' '.join(map(str, args.samples_per_read))}, {os.cpu_count()} cores; ratios against disk")
    print(throughput_table(titles, rows, baseline="disk"))
    return 0


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
