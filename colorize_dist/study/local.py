"""Running a point here: the trainer in its own process (`python -m colorize_dist.train`, or torchrun for several
processes on this machine), so that a failing point cannot take the study down. Its output goes to RUN/study.log
and its exit status and last error line to RUN/study.json.

The point's process dies with the study: however the study ends (Ctrl-C, SIGTERM, SIGKILL, the OOM killer), the
trainer (or torchrun, which passes it on to its trainers) gets SIGTERM, saves a checkpoint at its next step and
exits. A study run again at once waits, up to STOP_TIMEOUT_S, for such a trainer to release the run dir's lock.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from colorize_dist.config import ConfigError, save_config
from colorize_dist.processes import dies_with_parent
from colorize_dist.study.plan import Point
from colorize_dist.study.record import FAILED, INCOMPLETE, LOG, PointState, last_error_line, write_record
from colorize_dist.training.rundir import LOCK_NAME
from colorize_dist.training.stop import EXIT_RESUMABLE
from colorize_dist.training.summary import SUMMARY, read_summary

CONFIG_NAME = "config.yaml"
# How long a trainer may take to checkpoint after SIGTERM: after Ctrl-C before it is killed, and how long a point
# waits for the run dir lock of a trainer still stopping (one of a study run that was killed).
STOP_TIMEOUT_S = 120
LOCK_POLL_S = 0.5


def check_local(point: Point) -> None:
    if point.launch.nodes > 1:
        raise ConfigError(f"point {point.name!r} asks for {point.launch.nodes} nodes: run the study on Slurm "
                          "(--partition …) or give it launch.nodes=1")


def trainer_command(point: Point) -> list[str]:
    trainer = ["-m", "colorize_dist.train", "--config", str(point.run_dir / CONFIG_NAME),
               "--run-dir", str(point.run_dir), "--resume", "auto"]
    if point.num_processes == 1:
        return [sys.executable, "-u", *trainer]
    return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(point.num_processes), *trainer]


def trainer_env(point: Point) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if point.launch.gpus_per_node == 0 and point.num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"  # several CPU processes: Accelerate's MULTI_CPU mode (gloo)
    return env


def run_point(point: Point) -> tuple[int | None, str | None]:
    """Train the point to its end (resuming from its last checkpoint, if any): (exit status, last error line).
    (None, why) when another trainer still holds the run dir after STOP_TIMEOUT_S; the point is then failed.

    Ctrl-C asks the trainer to checkpoint and stop (SIGTERM), then re-raises: running the study again resumes it.
    """
    point.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(point.cfg, point.run_dir / CONFIG_NAME)
    command = trainer_command(point)
    holder = wait_for_run_dir(point.run_dir, STOP_TIMEOUT_S)
    if holder is not None:
        error = (f"run dir {point.run_dir} is locked by {holder}, a trainer still running after {STOP_TIMEOUT_S} s; "
                 "run the study again once it has ended")
        write_record(point, launcher="local", command=shlex.join(command), returncode=None, error=error,
                     locked_by=holder)
        return None, error
    write_record(point, launcher="local", command=shlex.join(command), returncode=None)
    log_path = point.run_dir / LOG
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"==> {datetime.now(timezone.utc).isoformat(timespec='seconds')} {shlex.join(command)}\n")
        log.flush()
        start, started = log.tell(), time.time()
        # Its own session: Ctrl-C here is ours to pass on (as SIGTERM, in _stop).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=trainer_env(point),
                                   start_new_session=True, preexec_fn=dies_with_parent(signal.SIGTERM, os.getpid()))
        try:
            status = process.wait()
        except KeyboardInterrupt:
            _stop(process)
            write_record(point, launcher="local", command=shlex.join(command), returncode=None,
                         error="interrupted (Ctrl-C)")  # incomplete: the next run resumes it
            raise
    summary = read_summary(point.run_dir)
    if status not in (0, EXIT_RESUMABLE) and summary is not None and not summary["finished"] and \
            (point.run_dir / SUMMARY).stat().st_mtime >= started:
        status = EXIT_RESUMABLE  # torchrun reports its ranks' 75 as 1; the run's summary says it stopped to resume
    error = None
    if status not in (0, EXIT_RESUMABLE):
        with open(log_path, encoding="utf-8", errors="replace") as log:
            log.seek(start)
            error = last_error_line(log.read()) or f"the trainer exited with status {status}"
    write_record(point, launcher="local", command=shlex.join(command), returncode=status, error=error)
    return status, error


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the trainer's RUN/.lock (`pid N on HOST`, as it writes there), or None when it is free."""
    path = run_dir / LOCK_NAME
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a trainer holds it exclusively
    except BlockingIOError:
        return path.read_text().strip() or "another process"
    finally:
        os.close(descriptor)  # and with it the shared lock, at once
    return None


def wait_for_run_dir(run_dir: Path, timeout_s: float) -> str | None:
    """Until no trainer holds the run dir, for at most `timeout_s`: None when free, else who still holds it."""
    deadline = time.monotonic() + timeout_s
    while (holder := lock_holder(run_dir)) is not None and time.monotonic() < deadline:
        time.sleep(LOCK_POLL_S)
    return holder


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the trainer's process group (it saves a checkpoint at its next step); SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def local_state(record: dict[str, Any], log: Path) -> PointState | None:
    """A local launch's state from its record; None when the trainer ended well (its summary tells the rest)."""
    status = record.get("returncode")
    if record.get("locked_by") is not None:
        return PointState(FAILED, record.get("error"), log)
    if status is None:
        return PointState(INCOMPLETE, "started but not ended (interrupted, or running now)", log)
    if status == EXIT_RESUMABLE:
        return PointState(INCOMPLETE, "stopped early with a checkpoint; run the study again to resume", log)
    if status != 0:
        return PointState(FAILED, record.get("error") or f"the trainer exited with status {status}", log)
    return None
