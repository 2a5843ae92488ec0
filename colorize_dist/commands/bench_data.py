"""`colorize-dist bench data`: images/s of the DALI pipeline and the reference loader, side by side."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from colorize_dist.data.config import DataConfig
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
    import torch
    from tabulate import tabulate

    from colorize_dist.bench.data import loader_runs, throughput_table, time_loaders
    from colorize_dist.data.loader import dali_available

    if args.epochs < 1 or min(args.resolutions) < 1:
        raise UserError("--epochs and --resolutions must be at least 1", exit_status=1)
    if args.resume_at is not None and not 0.0 < args.resume_at < 1.0:
        raise UserError("--resume-at must be between 0 and 1", exit_status=1)
    if not dali_available():
        raise UserError("nvidia.dali is not installed; pip install 'colorize-dist[dali]'", exit_status=1)
    if args.latency is not None or args.url is not None:
        return remote_main(args)
    timings = time_loaders(loader_runs(args.threads, on_gpu=torch.cuda.is_available()), args.resolutions,
                           shards=args.shards, images=args.images, threads=args.threads, batch_size=args.batch_size,
                           epochs=args.epochs, resume_at=args.resume_at)
    runs = timings.runs
    print(f"images/s and CPU ms per image, batch {args.batch_size}, {args.threads} DALI threads, "
          f"{runs[0].threads} reference workers, device {runs[-1].device}, {os.cpu_count()} cores")
    print(throughput_table([run.title for run in runs], timings.rows))
    if timings.resumes:
        print(f"\nresuming epoch 1 at {args.resume_at:g} of it: seconds from a new loader to its first batch")
        print(tabulate([[f"{resume.resolution}²", resume.loader, f"{resume.start_batch}/{resume.batches}",
                         resume.exact_s, resume.replay_s] for resume in timings.resumes],
                       ["resolution", "loader", "batch", "exact start", "replay"], floatfmt=".3f",
                       numalign="right", stralign="right"))
    return 0


def remote_main(args: argparse.Namespace) -> int:
    """Images/s of DALI on the CPU from disk, over HTTP at each --latency, and from --url, side by side."""
    from colorize_dist.bench import serve
    from colorize_dist.bench.data import throughput_table, time_remote_reads

    if args.latency is not None and not os.path.exists(serve.NGINX):
        raise UserError("--latency serves the shards with nginx, which is not installed (apt-get install -y nginx)",
                        exit_status=1)
    titles, rows = time_remote_reads(args.resolutions, shards=args.shards, images=args.images, threads=args.threads,
                                     batch_size=args.batch_size, epochs=args.epochs, latencies_ms=args.latency or [],
                                     url=args.url, cache=args.cache, reads_in_flight=args.reads_in_flight,
                                     samples_per_read=args.samples_per_read)
    print(f"images/s and CPU ms per image of DALI on the CPU, batch {args.batch_size}, {args.threads} threads, "
          f"data.reads_in_flight={args.reads_in_flight}, data.samples_per_read="
          f"{' '.join(map(str, args.samples_per_read))}, {os.cpu_count()} cores; ratios against disk")
    print(throughput_table(titles, rows, baseline="disk"))
    return 0
