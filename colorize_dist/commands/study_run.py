"""`colorize-dist study run`: a study's points checked, then run here or as Slurm job arrays."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from colorize_dist.commands.resources import add_resource_arguments, given_resources
from colorize_dist.config import ConfigError
from colorize_dist.errors import UserError
from colorize_dist.study.config import LAUNCH_PREFIX, study_names

if TYPE_CHECKING:
    from colorize_dist.study.plan import Plan


DESCRIPTION = """\
Run every point of a study (a shipped study's name or a YAML file), each in OUT/points/<point> (--out, default
studies/<name>), here
(--local) or as Slurm job arrays, then write its report (`colorize-dist study report`). KEY=VALUE overrides are
training keys for every point (data.shards=…) or study keys (budget.steps=…, launch.gpus_per_node=…). Running it
again skips finished points and resumes the others from their last checkpoint. The Slurm options are `submit`'s.

  colorize-dist study run smoke --local                       # here, one point after another
  colorize-dist study run seed000_table1 data.shards=/data/celeba-hq --partition gpu --time 24:00:00
  colorize-dist study run resolution_ladder data.shards=/data/ffhq --dry-run   # the points, nothing run

Exit status: 0 every point done (or submitted, without --wait); 1 some point failed or did not finish, or Slurm
refused the jobs; 2 bad study; 130 interrupted.
"""  # `colorize-dist study run --help`, for users


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """What `study run` and `study report` share: the study, its overrides, the output dir."""
    parser.add_argument("study", metavar="STUDY",
                        help=f"study file, or the name of a shipped one ({', '.join(study_names())})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training keys for every point (data.shards=/data/ffhq) or study keys "
                             "(budget.steps=100, launch.partition=gpu)")
    parser.add_argument("--out", type=Path, help="output dir: points/, results.csv, report.md, plots/ "
                                                 "(default: studies/<study name>)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_study_arguments(parser)
    parser.add_argument("--local", action="store_true", help="run the points here, one after another")
    parser.add_argument("--dry-run", action="store_true", help="print the points and their run dirs; run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    add_resource_arguments(parser, "Slurm (without --local; each sets launch.<option> where a point sets none)")
    group = parser.add_argument_group("Slurm job arrays")
    group.add_argument("--array-parallelism", type=int, metavar="N",
                       help="points of one job array running at once (the study's array_parallelism, default 256)")
    group.add_argument("--wait", action="store_true", help="wait for the jobs to end, then write the report")
    group.add_argument("--poll", type=float, default=10.0, metavar="SECONDS", help="squeue interval for --wait")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.study.load import load_plan
    from colorize_dist.study.record import DONE, write_study_args
    from colorize_dist.study.run import EXIT_FAILED, EXIT_INTERRUPTED, make_synthetic, run_local, run_slurm

    try:
        launch = [f"{LAUNCH_PREFIX}{name}={json.dumps(value)}" for name, value in given_resources(args).items()]
        launch += [] if args.array_parallelism is None else [f"array_parallelism={args.array_parallelism}"]
        plan, overrides = load_plan(args.study, [*args.overrides, *launch], args.out)
        if args.local:
            from colorize_dist.study.local import check_local

            for point in plan.points:
                check_local(point)
        elif not args.dry_run and not all(point.launch.partition for point in plan.points):
            raise ConfigError("give --local to run here, or --partition (or launch.partition in the study) for "
                              "Slurm")
    except ValueError as exc:  # ConfigError, or a value the plan cannot take
        raise UserError(str(exc)) from exc
    if args.dry_run:
        print_plan(plan, args.local)
        return 0
    plan.out.mkdir(parents=True, exist_ok=True)
    write_study_args(plan.out, plan.path, overrides)
    make_synthetic(plan)
    try:
        status = run_local(plan) if args.local else run_slurm(plan, args.wait, args.poll)
    except KeyboardInterrupt:
        print("study run: interrupted; run the same command again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    if status is None:  # submitted, not waited for
        return 0
    if not args.no_report:
        from colorize_dist.study.report import REPORT, summary_line, write_report

        results = write_report(plan)
        print(f"study run: {summary_line(results)}; report {plan.out / REPORT}")
        if any(result.state.status != DONE for result in results):
            status = EXIT_FAILED  # a failure of this run stays one, whatever the report finds
    return status


def print_plan(plan: Plan, local: bool) -> None:
    from colorize_dist.study.cluster import SLURM_FOLDER
    from colorize_dist.study.status import is_done

    print(f"study {plan.study.name}: {len(plan.points)} points in {plan.out}/points"
          + (f"; synthetic data {plan.synthetic}" if plan.synthetic else ""))
    for point in plan.points:
        cfg, launch = point.cfg, point.launch
        length = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs} epochs"
        slurm = "" if local else f", partition {launch.partition or '(default)'}, {launch.time} per allocation"
        print(f"  {point.name}: {point.run_dir.name}, {cfg.data.resolution}², batch {cfg.train.batch_size}, "
              f"{length}, {point.num_processes} process(es) on {launch.nodes} node(s){slurm}"
              + (" (done)" if is_done(point, plan.out / SLURM_FOLDER) else ""))
