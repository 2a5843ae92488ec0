"""Training under torch elastic (`torchrun --nnodes MIN:MAX --max-restarts N --rdzv-backend c10d`): what the trainer
adds so that the launcher's restarts continue the run by themselves.

When a node is lost, the ranks left see their next collective fail, name the lost ranks (peers.py) and exit with
status 3. torchrun's agent on each node left then tears its workers down, meets the other agents again (at least MIN
nodes) and starts the trainers anew, which resume from the newest valid checkpoint on the new number of processes
with the same global batch (resume.py). A failure costs one of --max-restarts; the restarts used so far and the
budget are in the workers' environment (TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS), so the lost-rank
line says whether the launcher restarts the workers or the budget is spent and the job ends. A node that comes back
waits at the rendezvous: the agents see it, stop their workers (SIGTERM: the ranks checkpoint together, see stop.py)
and re-form with it; that costs no restart and no step.

The lowest rank left writes what was lost, at which step, of how many ranks, to RUN/lost.json; the next start's
rank 0 turns it into one line (`restart_report`): the restart, who was lost, the new number of processes, the step
resumed from, the steps lost and the seconds from the loss's detection to training again (to this process's start:
the workers' exit and the re-rendezvous; from there: imports, process group, data and the checkpoint's load); then
removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from colorize_dist.files import atomic_write

LOST_RECORD = "lost.json"  # RUN/lost.json: the last loss of ranks, until a start resumes after it


def restarts(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(restarts used, --max-restarts) of the torchrun agent that started this process; (0, 0) without one."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)), int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0))


def after_loss(last: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """What happens after a loss of ranks, for the end of the lost-rank line: a restart by the launcher, or a rerun."""
    used, budget = restarts(environ)
    resume = f"resume from {last or 'the start (no checkpoint yet)'}"
    if used < budget:
        return f"torchrun restarts the workers on the nodes left (restart {used + 1} of {budget}), which {resume}"
    spent = f"torchrun's restart budget is spent ({used} of --max-restarts {budget}): the job ends; " if budget else ""
    return f"{spent}rerun every node to {resume}"


def record_loss(run_dir: Path, lost: str, step: int | None, world_size: int) -> None:
    """RUN/lost.json, for the next start's `restart_report` (by one rank: the lowest rank left)."""
    atomic_write(run_dir / LOST_RECORD, json.dumps({"lost": lost, "step": step, "world_size": world_size,
                                                    "detected": time.time()}))


def restart_report(run_dir: Path, step: int, world_size: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """One line on a start that resumes after a loss of ranks (RUN/lost.json, which it removes), else None."""
    path = run_dir / LOST_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    used, budget = restarts(environ)
    start = f"restart {used} of {budget}" if used else "rerun"
    reached = record.get("step")
    at = "" if reached is None else f" at step {reached}"
    lost_steps = "steps lost unknown" if reached is None else _count(max(0, reached - step), "step") + " lost"
    now, started = time.time(), psutil.Process().create_time()
    return (f"{start} after losing {record['lost']}{at}: {_count(world_size, 'process', 'processes')} now "
            f"({record['world_size']} before), resumed from step {step}, {lost_steps}; training again "
            f"{now - record['detected']:.1f} s after the loss was detected ({started - record['detected']:.1f} s to "
            f"this process's start, {now - started:.1f} s from there to the checkpoint loaded)")


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"
