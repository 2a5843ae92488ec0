"""`colorize-dist bench gpu`: a GPU node's benchmark, its stages chosen and checked here."""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.bench.names import GPU_STAGES
from colorize_dist.errors import UserError

DESCRIPTION = """\
Benchmark a GPU node, stage by stage:
  env     GPU, driver, library versions and a bf16 matrix product's TFLOP/s (the measured peak for MFU)
  color   `bench color` on the GPU: our RGB→Lab kernel against kornia and a device-to-device copy
  data    `bench data`: the reference loader against DALI cpu and DALI mixed (GPU decoding)
  train   `bench train` with res256 and res512: images/s, peak memory, MFU
  memory  peak memory of a few bf16 steps of res512 and res1024, and the largest batch that fits

Writes DIR/report.md and DIR/results.json, rewritten after every stage. Data and training read synthetic shards
written to a temporary folder, or --shards DIR. The perceptual loss needs VGG16's weights on disk (or loss.beta=0).

  colorize-dist bench gpu --out bench-gpu                    # every stage
  colorize-dist bench gpu --stages color,data --out DIR      # some of them (env always runs first)
  colorize-dist bench gpu --out DIR loss.vgg_weights=PATH    # overrides for every training run

Exit status: 0 every stage measured; 1 some stage failed (its error is in the report); 2 no CUDA device.
"""  # `colorize-dist bench gpu --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-gpu"), help="folder of report.md and results.json "
                                                                            "(default ./bench-gpu)")
    parser.add_argument("--stages", default=",".join(GPU_STAGES), metavar="A,B",
                        help=f"comma-separated, some of {','.join(GPU_STAGES)} (default all; env always runs first)")
    parser.add_argument("--shards", type=Path, help="shard set for the data and training stages (default: synthetic)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training variant")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the training rates")
    parser.add_argument("--run-timeout", type=float, default=1200.0, metavar="SECONDS",
                        help="a training run taking longer is stopped and recorded as failed")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every training run")


def main(args: argparse.Namespace) -> int:
    import torch

    from colorize_dist.bench.gpu import EXIT_NO_GPU, BenchOptions, run_benchmark

    if args.steps <= args.warmup + 1 or args.warmup < 1:
        raise UserError("need 1 <= --warmup < --steps - 1")
    chosen = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(GPU_STAGES))
    if unknown or not chosen:
        raise UserError(f"--stages {args.stages!r}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{','.join(GPU_STAGES)}")
    if not torch.cuda.is_available():
        raise UserError("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU node, or use "
                        "bench color / data / train for CPU figures", exit_status=EXIT_NO_GPU)
    stages = ("env", *(name for name in GPU_STAGES if name in chosen))
    return run_benchmark(BenchOptions(out=args.out, stages=stages, shards=args.shards, steps=args.steps,
                                      warmup=args.warmup, run_timeout=args.run_timeout,
                                      overrides=tuple(args.overrides)))
