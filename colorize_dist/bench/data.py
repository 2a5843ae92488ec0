"""Images/s of the DALI pipeline and the reference loader, side by side, on the same shards and threads.

Each loader makes training batches (read and check, decode, random resized crop, flip, RGB → (l, ab)) for
one warm-up epoch and then `--epochs` timed ones, from one loader (the DALI pipeline is built once). The
CPU columns are the CPU time per image of the whole process and its workers: on a busy machine they say
more than images/s. Without --shards, synthetic JPEG shards are written to a temporary directory at each
resolution. On a GPU the table adds DALI with mixed (GPU) decoding, and the reference loader uses all CPU
cores.

--resume-at F also times a resumed epoch: from a new loader to the first batch of epoch 1 at batch
round(F × batches per epoch), against replaying the consumed batches (decoding them, which is what the DALI
loader did before it could start an epoch at any batch).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from colorize_dist.data import synth
from colorize_dist.data.config import DataConfig
from colorize_dist.data.loader import build_loader, dali_available
from colorize_dist.data.make import ShardOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=Path, help="shard set to read at every resolution (default: synthetic)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=1024, help="synthetic images per resolution")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one")
    parser.add_argument("--resume-at", type=float, metavar="F",
                        help="also time resuming epoch 1 at this fraction of it (0 < F < 1), e.g. 0.5")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1 or min(args.resolutions) < 1:
        raise SystemExit("bench data: --epochs and --resolutions must be at least 1")
    if args.resume_at is not None and not 0.0 < args.resume_at < 1.0:
        raise SystemExit("bench data: --resume-at must be between 0 and 1")
    if not dali_available():
        raise SystemExit("bench data: nvidia.dali is not installed; pip install 'colorize-dist[dali]'")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    # (column title, backend, threads, device): on a GPU DALI decodes there and the reference gets every core.
    runs = [("reference", "reference", os.cpu_count() if on_gpu else args.threads, device),
            ("DALI cpu", "dali", args.threads, torch.device("cpu"))]
    if on_gpu:
        runs.append(("DALI mixed", "dali", args.threads, device))
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        options = ShardOptions(val_fraction=0.0, workers=args.threads)
        shards = {resolution: args.shards or synth.write_synthetic_shards(
                      Path(scratch) / str(resolution), args.images, resolution, options=options)
                  for resolution in args.resolutions}
        print(f"images/s and CPU ms per image, batch {args.batch_size}, {args.threads} DALI threads, "
              f"{runs[0][2]} reference workers, device {device}, {os.cpu_count()} cores")
        titles = [title for title, *_ in runs]
        print(f"{'resolution':>10} " + " ".join(f"{title:>10}" for title in titles) + f" {'DALI/ref':>9}  "
              + " ".join(f"{'CPU ' + title.split()[0]:>10}" for title in titles[:2]) + f" {'CPU ref/DALI':>13}")
        resumes = []
        for resolution, shard_dir in shards.items():
            configs = [DataConfig(shards=str(shard_dir), resolution=resolution, backend=backend, num_threads=threads)
                       for _, backend, threads, _ in runs]
            measured = [throughput(cfg, run_device, args) for cfg, (*_, run_device) in zip(configs, runs, strict=True)]
            rates = [rate for rate, _ in measured]
            cpu = [cpu_ms for _, cpu_ms in measured]
            print(f"{resolution:>9}² " + " ".join(f"{rate:>10.0f}" for rate in rates)
                  + f" {max(rates[1:]) / rates[0]:>8.2f}×  " + " ".join(f"{ms:>10.2f}" for ms in cpu[:2])
                  + f" {cpu[0] / cpu[1]:>12.2f}×")
            if args.resume_at is not None:
                resumes += [(resolution, title, *resume_latency(cfg, run_device, args))
                            for cfg, (title, *_, run_device) in zip(configs, runs, strict=True)]
        if resumes:
            print(f"\nresuming epoch 1 at {args.resume_at:g} of it: seconds from a new loader to its first batch")
            print(f"{'resolution':>10} {'loader':>10} {'batch':>9} {'exact start':>12} {'replay':>9}")
            for resolution, title, start, batches, exact, replay in resumes:
                print(f"{resolution:>9}² {title:>10} {f'{start}/{batches}':>9} {exact:>12.3f} {replay:>9.3f}")
    return 0


def throughput(cfg: DataConfig, device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `args.epochs` epochs after a warm-up one, from one loader."""
    images = 0
    with build_loader(cfg, "train", batch_size=args.batch_size, device=device) as loader:
        for epoch in range(args.epochs + 1):
            if epoch == 1:
                start, cpu_start, images = time.perf_counter(), _cpu_seconds(), 0
            for batch in loader.epoch(epoch):
                images += len(batch.keys)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return images / (time.perf_counter() - start), (_cpu_seconds() - cpu_start) / images * 1e3


def resume_latency(cfg: DataConfig, device: torch.device, args: argparse.Namespace) -> tuple[int, int, float, float]:
    """(start batch, batches per epoch, seconds to the first batch of a resumed epoch 1, seconds to reach the same
    batch by decoding the ones before it), each from a new loader."""
    timings = []
    for replay in (False, True):
        begin = time.perf_counter()
        with build_loader(cfg, "train", batch_size=args.batch_size, device=device) as loader:
            start_batch = round(args.resume_at * loader.batches_per_epoch)
            batches = loader.epoch(1, 0 if replay else start_batch)
            for _ in range(start_batch + 1 if replay else 1):
                next(batches)
            batches.close()
            timings.append(time.perf_counter() - begin)
    return start_batch, loader.batches_per_epoch, timings[0], timings[1]


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the reference loader's workers, joined every epoch)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
