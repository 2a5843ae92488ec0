"""A point's state: done, failed (with its error), incomplete, outdated or not started.

Put together from the trainer's RUN/summary.json and the study's record of its last launch, whose outcome the
launcher that made it reads back (`local.local_state`: the trainer's exit status; `cluster.job_state`: submitit's
result pickles and Slurm's queue). A point is done when its summary says it finished, it ran with the config the
study plans for it now (a study whose budget grew runs its finished points on, from their last checkpoint) and
the study's last launch of it did not fail: a point whose launch failed (its trainer's error, a run dir locked by
another trainer) is failed, whatever summary.json another or an earlier run left.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from colorize_dist.study.cluster import job_state
from colorize_dist.study.local import local_state
from colorize_dist.study.plan import Point
from colorize_dist.study.record import (
    DONE,
    FAILED,
    INCOMPLETE,
    LOG,
    NOT_STARTED,
    OUTDATED,
    PointState,
    planned_config,
    read_record,
)
from colorize_dist.training.summary import read_summary


def config_matches(point: Point) -> bool:
    """Whether the point last ran with the config the study plans for it now (from RUN/study.json, else from the
    trainer's RUN/config.yaml for a run dir the study did not launch)."""
    record = read_record(point.run_dir)
    if record is not None and "config" in record:
        return record["config"] == planned_config(point)
    try:
        saved = yaml.safe_load((point.run_dir / "config.yaml").read_text())
    except FileNotFoundError:
        return False
    return saved == planned_config(point)


def is_done(point: Point, slurm_folder: Path, active_jobs: set[str] | None = None) -> bool:
    return point_state(point, slurm_folder, active_jobs).status == DONE


def point_state(point: Point, slurm_folder: Path, active_jobs: set[str] | None = None) -> PointState:
    """The point's state. `active_jobs`: Slurm job ids still queued or running (None: Slurm not asked)."""
    summary = read_summary(point.run_dir)
    finished = bool(summary and summary.get("finished"))
    record = read_record(point.run_dir)
    launch = None  # the last launch's state: None when it ended well (or the study never launched the point)
    if record is not None and record.get("launcher") == "slurm":
        launch = job_state(record["job_id"], slurm_folder, active_jobs)
    elif record is not None:
        launch = local_state(record, point.run_dir / LOG)
    if launch is not None and launch.status == FAILED:
        return launch
    if finished and config_matches(point):
        return PointState(DONE)
    if launch is not None:  # not ended
        return launch
    if finished:
        return PointState(OUTDATED, "finished with other settings than the study's now; run the study again")
    if record is None:
        return PointState(NOT_STARTED)
    return PointState(INCOMPLETE, "the trainer ended without writing summary.json; run the study again")
