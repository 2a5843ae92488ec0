"""Images/s of the DALI pipeline and the reference loader, side by side, on the same shards and threads.

Each loader makes training batches (decode, random resized crop, flip, RGB → (l, ab)) for one
warm-up epoch and then `--epochs` timed ones. Without --shards, synthetic JPEG shards are written to
a temporary directory at each resolution. On a GPU the table adds DALI with mixed (GPU) decoding, and
the reference loader uses all CPU cores.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--images", type=int, default=256, help="synthetic images per resolution")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise SystemExit("bench data: --epochs must be at least 1")
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
        print(f"images/s, batch {args.batch_size}, {args.threads} DALI threads, "
              f"{runs[0][2]} reference workers, device {device}")
        print(f"{'resolution':>10} " + " ".join(f"{title:>12}" for title, *_ in runs) + f" {'DALI/ref':>9}")
        for resolution, shard_dir in shards.items():
            rates = [images_per_second(DataConfig(shards=str(shard_dir), resolution=resolution, backend=backend,
                                                  num_threads=threads), run_device, args)
                     for _, backend, threads, run_device in runs]
            speedup = max(rates[1:]) / rates[0]
            print(f"{resolution:>9}² " + " ".join(f"{rate:>12.0f}" for rate in rates) + f" {speedup:>8.2f}×")
    return 0


def images_per_second(cfg: DataConfig, device: torch.device, args: argparse.Namespace) -> float:
    loader = build_loader(cfg, "train", batch_size=args.batch_size, device=device)
    images = 0
    for epoch in range(args.epochs + 1):
        if epoch == 1:
            start, images = time.perf_counter(), 0
        for batch in loader.epoch(epoch):
            images += len(batch.keys)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)
