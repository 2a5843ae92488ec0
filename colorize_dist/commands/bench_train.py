"""`colorize-dist bench train`: steps/s, images/s and MFU of the training variants, one run each."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from colorize_dist.bench.names import VARIANTS
from colorize_dist.errors import UserError

DESCRIPTION = """\
Time training: fp32 eager against bf16, bf16 + channels_last and + torch.compile, each a real training run of
the config for --steps optimizer steps on one device. Prints steps/s and images/s of each variant side by side, and on
a GPU the model FLOPs utilisation. Without data.shards in the config, synthetic shards are made once at the config's
resolution. KEY=VALUE overrides apply to every variant.

  colorize-dist bench train --config configs/res256.yaml --steps 60 train.batch_size=32
"""  # `colorize-dist bench train --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="training config (default: the tiny preset)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the rates")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="NAME",
                        help=f"subset of: {'; '.join(VARIANTS)}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")


def main(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from colorize_dist.bench.train import DEFAULT_CONFIG, make_synthetic_shards, mfu, run_variant
    from colorize_dist.training.config import load_training_config

    if args.steps <= args.warmup + 1 or args.warmup < 1:
        raise UserError("need 1 <= --warmup < --steps - 1", exit_status=1)
    cfg = load_training_config(args.config or DEFAULT_CONFIG, args.overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        shards = cfg.data.shards or make_synthetic_shards(Path(scratch) / "shards", cfg)
        for index, name in enumerate(args.variants):
            print(f"bench train: {name} ...", file=sys.stderr, flush=True)
            result = run_variant(name, Path(scratch) / f"run-{index}", config=args.config, shards=shards,
                                 overrides=args.overrides, steps=args.steps, warmup=args.warmup)
            rows.append([name, result.steps_per_s, result.images_per_s, result.data_wait,
                         mfu(cfg, result.images_per_s, name)])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"batch {cfg.train.batch_size}, {cfg.data.resolution}², {args.steps} steps ({args.warmup} warm-up), "
          f"one process on {device}")
    print(tabulate(rows, ["variant", "steps/s", "images/s", "data wait", "MFU"],
                   floatfmt=("", ".1f", ",.1f", ".3g", ".1%"), numalign="right", missingval="n/a"))
    return 0
