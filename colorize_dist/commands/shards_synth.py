"""`colorize-dist shards synth`: the built-in synthetic dataset as a shard set."""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.commands.shards_make import add_writer_arguments, writer_options

DESCRIPTION = """\
Write the built-in synthetic dataset (smooth backgrounds with coloured shapes whose colour the lightness
tells) as a shard set in OUT, through the same writer as `shards make`: OUT/train, OUT/val, indexes, manifest.json.

  colorize-dist shards synth data/synth --n 512 --resolution 64
"""  # `colorize-dist shards synth --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="shard set directory to create")
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--resolution", type=int, default=64, help="side of the square images")
    add_writer_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from colorize_dist.data.synth import write_synthetic_shards

    write_synthetic_shards(args.out, args.n, args.resolution, options=writer_options(args))
    return 0
