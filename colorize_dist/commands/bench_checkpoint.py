"""`colorize-dist bench checkpoint`: how long a checkpoint holds the step, hashing on it vs after."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from colorize_dist.errors import UserError

DESCRIPTION = """\
Time how long saving a checkpoint holds the training step, with a preset's networks, optimizer states and EMA:
rank 0 hashing, renaming and pruning on the step against in a background thread. Prints a table of seconds per save
of each way. Checkpoints go to --dir (default: a temporary folder).

  colorize-dist bench checkpoint                      # res1024's networks, 3 saves of each, alternating
  colorize-dist bench checkpoint --config res256 --repeats 5
"""  # `colorize-dist bench checkpoint --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="res1024", help="preset or YAML whose networks are saved")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each variant (alternating)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from colorize_dist.bench.checkpoint import measure

    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = measure(args.config, Path(folder), args.repeats)
    print(tabulate(rows, ["variant", "checkpoint MiB", "step blocked s (median)", "until complete s (median)"],
                   tablefmt="github", floatfmt=(".0f", ",.0f", ".2f", ".2f")))
    return 0
