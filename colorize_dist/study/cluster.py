"""Running points on Slurm: one submitit job array per set of resources (a node ladder makes several), every point
a `TrainingJob` that checkpoints and requeues itself. submitit's scripts, logs and result pickles go to OUT/slurm;
each point's RUN/study.json records its job id, from which its state is read back."""

from __future__ import annotations

import dataclasses
import pickle
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from submitit.core.utils import JobPaths

from colorize_dist.launch.resources import SlurmResources
from colorize_dist.launch.slurm import submit, training_job
from colorize_dist.study.plan import Point
from colorize_dist.study.record import FAILED, INCOMPLETE, PointState, last_error_line, write_record

SLURM_FOLDER = "slurm"  # OUT/slurm
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}
# Lines of a task's log that are Slurm's, submitit's or the launcher's, not the trainer's.
_LAUNCHER_LINES = re.compile(r"^srun: |^submitit (INFO|WARNING|ERROR)|TrainerFailedError")


def submit_points(points: Iterable[Point], folder: Path, job_name: str, array_parallelism: int) -> dict[str, str]:
    """Submit the points, one job array per distinct set of resources: {point name: Slurm job id}. SlurmError
    when Slurm refuses them.

    Every point resumes from its last checkpoint, if it has one (`--resume auto`); a point's `launch.job_name`
    wins over `job_name`.
    """
    groups: dict[tuple, tuple[SlurmResources, list[Point]]] = {}
    for point in points:
        resources = dataclasses.replace(point.launch, job_name=point.launch.job_name or job_name)
        groups.setdefault(dataclasses.astuple(resources), (resources, []))[1].append(point)
    job_ids = {}
    for resources, group in groups.values():
        runs = [(point.cfg, training_job(point.cfg, point.run_dir, resources)) for point in group]
        for point, job in zip(group, submit(runs, resources, folder, array_parallelism), strict=True):
            write_record(point, launcher="slurm", job_id=job.job_id, folder=str(folder.absolute()))
            job_ids[point.name] = job.job_id
    return job_ids


def active_jobs() -> set[str] | None:
    """Ids of the jobs (array elements one by one) that Slurm still has queued or running; None without squeue."""
    if shutil.which("squeue") is None:
        return None
    listing = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    if listing.returncode != 0:
        return None
    rows = (line.split() for line in listing.stdout.splitlines())
    return {row[0] for row in rows if len(row) == 2 and row[1] in ACTIVE_STATES}


def wait_for(job_ids: Iterable[str], poll_s: float = 10.0, on_change=None) -> None:
    """Until none of `job_ids` is queued or running; `on_change(active)` each time the active set changes."""
    waiting, before = set(job_ids), None
    while waiting:
        active = active_jobs()
        if active is None:
            raise RuntimeError("squeue does not answer: cannot wait for the study's jobs")
        waiting &= active
        if on_change is not None and waiting != before:
            on_change(waiting)
        before = set(waiting)
        if waiting:
            time.sleep(poll_s)


def job_state(job_id: str, folder: Path, active: set[str] | None) -> PointState | None:
    """A Slurm point's state from submitit's result pickles and task logs in `folder`, and whether Slurm still has
    the job (`active`: from `active_jobs`, None when unknown); None when every task returned a finished run."""
    log = JobPaths(folder, job_id=job_id, task_id=0).stderr
    pattern = re.compile(rf"{re.escape(job_id)}_(\d+)_result\.pkl")
    outcomes = {}
    for path in folder.glob(f"{job_id}_*_result.pkl"):
        if (match := pattern.fullmatch(path.name)) is not None:
            try:
                outcomes[int(match.group(1))] = pickle.loads(path.read_bytes())
            except Exception as exc:  # an unreadable pickle is reported, not raised: the report lists every point
                outcomes[int(match.group(1))] = ("error", f"unreadable result {path.name}: {exc}")
    for task, (kind, value) in sorted(outcomes.items()):
        if kind == "error":
            task_log = JobPaths(folder, job_id=job_id, task_id=task).stderr
            return PointState(FAILED, _trainer_error(task_log) or last_error_line(str(value)), task_log)
    if outcomes:
        if all(getattr(value, "finished", False) for _, value in outcomes.values()):
            return None
        return PointState(INCOMPLETE, f"Slurm job {job_id} stopped early with a checkpoint; run the study again to "
                                      "resume", log)
    if active is None:
        return PointState(INCOMPLETE, f"Slurm job {job_id}: no result yet (squeue not available to ask)", log)
    if job_id in active:
        return PointState(INCOMPLETE, f"Slurm job {job_id} is queued or running", log)
    return PointState(FAILED, _trainer_error(log) or f"Slurm job {job_id} ended without a result (cancelled, or killed "
                                                     "by Slurm); see its log", log)


def _trainer_error(task_log: Path) -> str | None:
    try:
        text = task_log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    return last_error_line("\n".join(line for line in text.splitlines() if not _LAUNCHER_LINES.search(line)))
