"""Run every point of a study, each in its own run dir, then write its report.

Every point is checked before anything runs, and running a study again resumes it (finished points skipped, queued
or running Slurm jobs left alone), so a study survives its own interruption. --local runs points as child processes
that checkpoint on SIGTERM; on Slurm, one submitit job array per set of resources.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import time

from colorize_dist.data.manifest import MANIFEST
from colorize_dist.data.options import ShardOptions
from colorize_dist.data.synth import write_synthetic_shards
from colorize_dist.study.cluster import SLURM_FOLDER
from colorize_dist.study.plan import Plan
from colorize_dist.study.record import read_record
from colorize_dist.study.status import is_done

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


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
