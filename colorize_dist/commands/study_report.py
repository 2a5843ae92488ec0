"""`colorize-dist study report`: a study's results.csv, report.md and plots from its points' run dirs."""

from __future__ import annotations

import argparse

from colorize_dist.commands.study_run import add_study_arguments

DESCRIPTION = """\
Write a study's results: OUT/results.csv, OUT/report.md and OUT/plots/*.png. Per point: its status, final and
best validation metrics, images/s, step time, data wait, peak memory, parameters, FLOPs, training compute and, on
GPUs, MFU. Overrides given to `study run` are reused when none are given here.

  colorize-dist study report smoke                    # studies/smoke, as `study run smoke --local` left it
  colorize-dist study report node_ladder --out /scratch/studies/ladder --peak-tflops 989

Exit status: 0 written; 2 bad study.
"""  # `colorize-dist study report --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_study_arguments(parser)
    parser.add_argument("--peak-tflops", type=float, metavar="T",
                        help="peak TFLOPS of one GPU for MFU (default: from the GPU's name and the run's precision)")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.study.load import load_plan
    from colorize_dist.study.plots import PLOTS
    from colorize_dist.study.report import REPORT, RESULTS, summary_line, write_report

    plan, _ = load_plan(args.study, args.overrides, args.out, reuse_overrides=True)
    results = write_report(plan, args.peak_tflops)
    print(summary_line(results))
    print(f"report: {plan.out / REPORT}  results: {plan.out / RESULTS}  plots: {plan.out / PLOTS}/")
    return 0
