"""`colorize-dist runs`: throughput, MFU, memory and validation of runs over their steps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Show throughput, MFU, memory and validation of one or more runs over their steps, from each run's
RUN/metrics.jsonl and RUN/summary.json: a table per run, and with --plot a figure comparing them.

  colorize-dist runs runs/res256                       # a table per run
  colorize-dist runs runs/a runs/b --plot runs.png     # and a figure comparing them
"""  # `colorize-dist runs --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--plot", type=Path, default=None, help="also write a figure (PNG, PDF, SVG) here")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.training.runs import plot, report
    from colorize_dist.training.summary import read_summary
    from colorize_dist.training.telemetry import read_metrics

    missing = [str(run) for run in args.runs if not (run / "metrics.jsonl").is_file()]
    if missing:
        print(f"runs: no metrics.jsonl in {', '.join(missing)} (a run writes it from its first logging step)",
              file=sys.stderr)
        return 2
    histories = [(run, read_metrics(run)) for run in args.runs]
    for run, records in histories:
        print(report(run, records, read_summary(run)))
    if args.plot is not None:
        plot(histories, args.plot)
        print(f"wrote {args.plot}")
    return 0
