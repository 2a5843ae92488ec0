"""`colorize-dist bench telemetry`: what the per-interval metrics cost a training step."""

from __future__ import annotations

import argparse

from colorize_dist.errors import UserError

DESCRIPTION = """\
Time what the per-interval training metrics cost: a training step of the preset's G and D, what the telemetry
adds to every step and to one logging step. Prints a table with the overhead per logging interval as a fraction of
train.log_every steps. One process; writes nothing.

  colorize-dist bench telemetry                 # the tiny preset at its batch and train.log_every
  colorize-dist bench telemetry --config res256 --steps 5
"""  # `colorize-dist bench telemetry --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="preset or YAML whose networks and batch are timed")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each variant (alternating blocks)")


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from colorize_dist.bench.telemetry import measure

    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    row = measure(args.config, args.steps)
    print(tabulate([row],
                   ["config", "batch", "log_every", "step ms", "hooks + tick per step µs",
                    "logging step's telemetry ms", "overhead per interval"],
                   tablefmt="github", floatfmt=("", "", "", ".1f", ".1f", ".3f", ".3%")))
    return 0
