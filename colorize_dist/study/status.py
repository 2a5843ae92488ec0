"""What a point's run dir says about it: done, failed (with its error), incomplete, outdated or not started.

The study keeps RUN/study.json: how it last launched the point and with which config (here: the trainer's exit
status and last error line, with its output in RUN/study.log; on Slurm: the job id, whose outcome and logs submitit
keeps in OUT/slurm). A point is done when the trainer's RUN/summary.json says it finished and it ran with the
config the study plans for it now (a study whose budget grew runs its finished points on, from their last
checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from colorize_dist.files import atomic_write
from colorize_dist.study.plan import Point
from colorize_dist.training.stop import EXIT_RESUMABLE
from colorize_dist.training.summary import read_summary

RECORD = "study.json"
LOG = "study.log"
DONE, FAILED, INCOMPLETE, OUTDATED, NOT_STARTED = "done", "failed", "incomplete", "outdated", "not started"

_ERROR_LINE = re.compile(r"^(\w+: |[\w.]*(Error|Exception|Interrupt)\b)|\b(Killed|oom-kill|out of memory)\b")
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|")
_RANK_PREFIX = re.compile(r"^\[(default)?rank\d+\]:")  # torch.distributed's prefix on each rank's traceback


@dataclass(frozen=True)
class PointState:
    status: str
    error: str | None = None  # one line; for failed points (and some incomplete ones)
    log: Path | None = None  # where the whole story is


def write_record(point: Point, **record: Any) -> None:
    """RUN/study.json: how the study launched the point, with the config it planned for it."""
    record |= {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": planned_config(point)}
    atomic_write(point.run_dir / RECORD, json.dumps(record, indent=1) + "\n")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except FileNotFoundError:
        return None


def last_error_line(text: str) -> str | None:
    """The line of a trainer's output that says what went wrong: the last line that looks like an error
    (`train: …`, `SomethingError: …`), else the last line that is not a progress bar."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in re.split(r"[\r\n]+", text)]
    lines = [line for line in lines if line and not _PROGRESS_BAR.search(line)]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or [None])[-1]


def planned_config(point: Point) -> dict[str, Any]:
    """The point's training config as plain data (what YAML and JSON give back)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(point.cfg), sort_keys=False))


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


def is_done(point: Point) -> bool:
    summary = read_summary(point.run_dir)
    return bool(summary and summary.get("finished")) and config_matches(point)


def point_state(point: Point, slurm_folder: Path, active_jobs: set[str] | None = None) -> PointState:
    """The point's state. `active_jobs`: Slurm job ids still queued or running (None: Slurm not asked)."""
    summary = read_summary(point.run_dir)
    finished = bool(summary and summary.get("finished"))
    if finished and config_matches(point):
        return PointState(DONE)
    record = read_record(point.run_dir)
    state = None
    if record is not None and record.get("launcher") == "slurm":
        from colorize_dist.study.cluster import job_state  # submitit's files; imported only for Slurm points

        state = job_state(record["job_id"], slurm_folder, active_jobs)
    elif record is not None:
        state = local_state(record, point.run_dir / LOG)
    if state is not None:  # failed, or not ended
        return state
    if finished:
        return PointState(OUTDATED, "finished with other settings than the study's now; run the study again")
    if record is None:
        return PointState(NOT_STARTED)
    return PointState(INCOMPLETE, "the trainer ended without writing summary.json; run the study again")


def local_state(record: dict[str, Any], log: Path) -> PointState | None:
    """A local launch's state from its record; None when the trainer ended well (its summary tells the rest)."""
    status = record.get("returncode")
    if status is None:
        return PointState(INCOMPLETE, "started but not ended (interrupted, or running now)", log)
    if status == EXIT_RESUMABLE:
        return PointState(INCOMPLETE, "stopped early with a checkpoint; run the study again to resume", log)
    if status != 0:
        return PointState(FAILED, record.get("error") or f"the trainer exited with status {status}", log)
    return None

ARGS = "study_args.json"  # OUT/study_args.json: the study file and command-line overrides of the last `study run`


def write_study_args(out: Path, study_path: Path, overrides: list[str]) -> None:
    atomic_write(out / ARGS, json.dumps({"study": str(study_path.absolute()), "overrides": overrides}, indent=1))


def read_study_args(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / ARGS).read_text())
    except FileNotFoundError:
        return None
