"""Run every point of a study, each in its own run dir, then write its report.

Every point is checked before anything runs, and running a study again resumes it (finished points skipped, queued
or running Slurm jobs left alone), so a study survives its own interruption. --local runs points as child processes
that checkpoint on SIGTERM; on Slurm, one submitit job array per set of resources.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time

from colorize_dist.config import ConfigError
from colorize_dist.data.make import ShardOptions
from colorize_dist.data.manifest import MANIFEST
from colorize_dist.data.synth import write_synthetic_shards
from colorize_dist.errors import UserError
from colorize_dist.launch.options import add_resource_arguments, given_resources
from colorize_dist.study.cluster import SLURM_FOLDER
from colorize_dist.study.command import add_study_arguments, load_plan
from colorize_dist.study.config import LAUNCH_PREFIX
from colorize_dist.study.plan import Plan
from colorize_dist.study.record import DONE, read_record, write_study_args
from colorize_dist.study.status import is_done

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


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
    print(f"study {plan.study.name}: {len(plan.points)} points in {plan.out}/points"
          + (f"; synthetic data {plan.synthetic}" if plan.synthetic else ""))
    for point in plan.points:
        cfg, launch = point.cfg, point.launch
        length = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs} epochs"
        slurm = "" if local else f", partition {launch.partition or '(default)'}, {launch.time} per allocation"
        print(f"  {point.name}: {point.run_dir.name}, {cfg.data.resolution}², batch {cfg.train.batch_size}, "
              f"{length}, {point.num_processes} process(es) on {launch.nodes} node(s){slurm}"
              + (" (done)" if is_done(point, plan.out / SLURM_FOLDER) else ""))


def make_synthetic(plan: Plan) -> None:
    """The study's shared synthetic shards, made once (as the trainer makes its own: PNG, 10% validation)."""
    if plan.synthetic is None or (plan.synthetic / MANIFEST).is_file():
        return
    print(f"study run: writing {plan.synthetic_images} synthetic images of {plan.synthetic_resolution}² to "
          f"{plan.synthetic}", flush=True)
    options = ShardOptions(image_format="png", shard_size=500, val_fraction=0.1, workers=1, force=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        write_synthetic_shards(plan.synthetic, plan.synthetic_images, plan.synthetic_resolution, options=options)


def run_local(plan: Plan) -> int:
    """Every point not done, one after another: 0 when each ended done, else EXIT_FAILED."""
    from colorize_dist.study.local import STOP_TIMEOUT_S, lock_holder, run_point

    unfinished = 0
    for index, point in enumerate(plan.points, 1):
        prefix = f"[{index}/{len(plan.points)}] {point.name}"
        if is_done(point, plan.out / SLURM_FOLDER):
            print(f"{prefix}: done, skipped", flush=True)
            continue
        if (holder := lock_holder(point.run_dir)) is not None:
            print(f"{prefix}: waiting up to {STOP_TIMEOUT_S} s for the run dir, locked by {holder} (a trainer "
                  "still stopping?)", flush=True)
        print(f"{prefix}: training in {point.run_dir} (log: {point.run_dir / 'study.log'})", flush=True)
        started = time.monotonic()
        status, error = run_point(point)
        took = f"{time.monotonic() - started:.0f} s"
        unfinished += status != 0
        if error is not None:
            print(f"{prefix}: FAILED after {took}" + (f" (exit status {status})" if status is not None else "")
                  + f": {error}", flush=True)
        else:
            print(f"{prefix}: {'done' if status == 0 else 'stopped early'} after {took}", flush=True)
    return EXIT_FAILED if unfinished else 0


def run_slurm(plan: Plan, wait: bool, poll_s: float) -> int | None:
    """Submit what is not done nor queued; with `wait`, until every job has ended (then 0), else None."""
    from colorize_dist.study.cluster import active_jobs, submit_points, wait_for

    active = active_jobs()
    waiting, to_submit = [], []
    for point in plan.points:
        job_id = (read_record(point.run_dir) or {}).get("job_id")
        if is_done(point, plan.out / SLURM_FOLDER, active):
            print(f"{point.name}: done, skipped")
        elif job_id in (active or set()):
            print(f"{point.name}: Slurm job {job_id} still queued or running, left alone")
            waiting.append(job_id)
        else:
            to_submit.append(point)
    folder = (plan.out / SLURM_FOLDER).absolute()
    # SlurmError (status 1): Slurm refused the jobs or is not installed
    submitted = submit_points(to_submit, folder, f"study-{plan.study.name}", plan.study.array_parallelism)
    for name, job_id in submitted.items():
        print(f"{name}: submitted as Slurm job {job_id}")
    if submitted:
        print(f"logs: {folder}/<job id>_<task>_log.{{out,err}}   cancel: scancel "
              f"{' '.join(sorted({job_id.split('_')[0] for job_id in submitted.values()}))}")
    if not wait:
        command = shlex.join(["colorize-dist", "study", "report", str(plan.path), "--out", str(plan.out)])
        print(f"when the jobs have ended: {command}")
        return None
    wait_for([*waiting, *submitted.values()], poll_s,
             on_change=lambda active: print(f"study run: {len(active)} job(s) queued or running", flush=True))
    return 0
