"""What the study keeps about each point and about itself: RUN/study.json (how it last launched the point, with
the config it planned for it), RUN/study.log (the trainer's output, for local launches), OUT/study_args.json (the
study file and overrides of the last `study run`), and the names of the states a point can be in.

The launchers write the records (`local`, `cluster`) and read back their own launches' outcomes; `status` puts a
point's state together from them and from the trainer's RUN/summary.json.
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

RECORD = "study.json"
LOG = "study.log"
ARGS = "study_args.json"  # OUT/study_args.json: the study file and command-line overrides of the last `study run`
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


def planned_config(point: Point) -> dict[str, Any]:
    """The point's training config as plain data (what YAML and JSON give back)."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(point.cfg), sort_keys=False))


def last_error_line(text: str) -> str | None:
    """The line of a trainer's output that says what went wrong: the last line that looks like an error
    (`train: …`, `SomethingError: …`), else the last line that is not a progress bar."""
    lines = [_RANK_PREFIX.sub("", line).strip() for line in re.split(r"[\r\n]+", text)]
    lines = [line for line in lines if line and not _PROGRESS_BAR.search(line)]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or [None])[-1]


def write_study_args(out: Path, study_path: Path, overrides: list[str]) -> None:
    atomic_write(out / ARGS, json.dumps({"study": str(study_path.absolute()), "overrides": overrides}, indent=1))


def read_study_args(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / ARGS).read_text())
    except FileNotFoundError:
        return None
