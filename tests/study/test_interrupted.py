"""A `study run --local` that dies mid-point leaves no trainer behind, and running it again resumes that point; a
point whose run dir another trainer holds is failed with that reason, never done, and the exit status says so."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from colorize_dist.study import local
from colorize_dist.study.config import load_study
from colorize_dist.study.plan import make_plan
from colorize_dist.training.rundir import LOCK_NAME
from tests.study.conftest import REPO, run_cli
from tests.training.helpers import subprocess_env

STEPS = 150
EXIT_BOUND_S = 60  # from the moment the point's processes can run again to the last one gone


def write_study(tmp_path: Path, processes: int, steps: int = STEPS) -> Path:
    """One point of the smoke study's shrunk model at 16², checkpointing every 5 steps."""
    path = tmp_path / "one_point.yaml"
    path.write_text(f"""
config: tiny
overrides: {{data.backend: reference, data.num_threads: 1, data.shuffle_buffer: 32, data.resolution: 16,
            model.generator.ndims: 4, model.generator.depth: 2, loss.theta: 0.0, train.batch_size: 8,
            train.log_every: 5, train.checkpoint_every: 5, train.validate_every: {steps}, train.sample_every: {steps},
            train.num_samples: 2, launch.tasks_per_node: {processes}}}
budget: {{steps: {steps}}}
metrics: [psnr_lab]
synthetic_images: 40
""")
    return path


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, logs: list[Path]) -> float:
    """Seconds until `condition()`; fails with the logs after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            tails = "\n".join(f"==> {log} <==\n{log.read_text(errors='replace')[-3000:]}" for log in logs
                              if log.is_file())
            pytest.fail(f"no {what} after {timeout:.0f} s\n{tails}")
        time.sleep(0.2)
    return time.monotonic() - started


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # ended; its new parent has not reaped it yet
    except psutil.NoSuchProcess:
        return True


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def start_study(study: Path, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", "colorize_dist", "study", "run", str(study), "--local",
                                 "--out", str(out)], stdout=output, stderr=subprocess.STDOUT, env=subprocess_env(),
                                cwd=REPO, start_new_session=True)


@pytest.mark.slow
def test_a_killed_study_leaves_no_trainer_and_a_rerun_resumes_the_point(tmp_path: Path) -> None:
    """SIGKILL of the study while its point trains under torchrun (2 processes). The point's processes are held
    (SIGSTOP) from just before the kill until the rerun is waiting for the run dir's lock, as a trainer still saving
    would hold it; then they must all end within EXIT_BOUND_S, and the rerun resume the point and finish it."""
    study, out = write_study(tmp_path, processes=2), tmp_path / "out"
    (run_dir,) = [point.run_dir for point in make_plan(*load_study(study), out).points]
    first_log, second_log, point_log = tmp_path / "first.log", tmp_path / "second.log", run_dir / "study.log"
    first = start_study(study, out, first_log)
    try:
        wait_until(lambda: any((run_dir / "checkpoints").glob("step-*")), 300, "first checkpoint",
                   [first_log, point_log])
        # torchrun, its 2 trainers, their helpers (not those that already ended)
        tree = [process for process in psutil.Process(first.pid).children(recursive=True) if not gone(process)]
        assert sum("colorize_dist.train" in command_line(process) for process in tree) >= 3, tree
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
    finally:
        first.kill()
        first.wait()

    second = start_study(study, out, second_log)
    try:
        wait_until(lambda: "waiting up to" in second_log.read_text(), 120, "wait for the run dir lock",
                   [second_log, point_log])
        assert second.poll() is None
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()
        exit_s = wait_until(lambda: all(gone(process) for process in tree), EXIT_BOUND_S,
                            "end of the killed study's point processes", [point_log])
        print(f"\nthe killed study's point: every process gone {exit_s:.1f} s after it could run again")
        assert second.wait(timeout=600) == 0, second_log.read_text()
    finally:
        for process in tree:
            if not gone(process):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        second.kill()
        second.wait()
    output = second_log.read_text()
    assert "FAILED" not in output and "1 points: 1 done" in output, output
    last_start = point_log.read_text().rsplit("==> ", 1)[-1]  # the rerun's trainer
    resumed = re.search(rf"resumed from {re.escape(str(run_dir / 'checkpoints'))}/step-\d+ at step (\d+)", last_start)
    assert resumed is not None, last_start
    assert int(resumed.group(1)) < STEPS  # the killed study's trainers stopped on SIGTERM, not at their end
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["finished"], summary["step"]) == (True, STEPS), summary
    assert [row["status"] for row in read_rows(out)] == ["done"]


def test_a_point_whose_run_dir_is_locked_fails_with_the_holder_and_is_never_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another trainer (here, this test) holds RUN/.lock through the wait: the point is failed naming the holder,
    the exit status is 1, and a summary that trainer then writes does not make the point done."""
    monkeypatch.setattr(local, "STOP_TIMEOUT_S", 1)
    study, out = write_study(tmp_path, processes=1, steps=10), tmp_path / "out"
    (run_dir,) = [point.run_dir for point in make_plan(*load_study(study), out).points]
    run_dir.mkdir(parents=True)
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    descriptor = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the trainer's run_dir_lock takes it
        os.write(descriptor, f"{holder}\n".encode())
        status, stdout, stderr = run_cli("study", "run", study, "--local", "--out", out)
        assert status == 1, stdout + stderr
        assert "FAILED" in stdout and f"locked by {holder}" in stdout, stdout
        assert not (run_dir / "study.log").exists()  # no trainer was started
        # The holder finishes the run and writes its summary.
        (run_dir / "summary.json").write_text(json.dumps({"finished": True, "step": 10, "total_steps": 10}))
    finally:
        os.close(descriptor)
    (row,) = read_rows(out)
    assert row["status"] == "failed" and f"locked by {holder}" in row["error"], row
    status, stdout, stderr = run_cli("study", "report", study, "--out", out)
    assert status == 0 and "1 points: 1 failed" in stdout, stdout + stderr
    (row,) = read_rows(out)
    assert row["status"] == "failed" and f"locked by {holder}" in row["error"], row


def test_the_point_process_gets_sigterm_when_the_study_dies(tmp_path: Path) -> None:
    """What run_point starts its process with: a shell that records the signal it gets, started by a stand-in for
    the study that is then killed with SIGKILL."""
    marker = tmp_path / "signal"
    starter = (
        "import os, signal, subprocess, sys\n"
        "from colorize_dist.processes import dies_with_parent\n"
        f"child = subprocess.Popen(['bash', '-c', 'trap \"echo TERM > {marker}; exit 0\" TERM; echo $$; "
        "while :; do sleep 0.1; done'], stdout=subprocess.PIPE, text=True, start_new_session=True, "
        "preexec_fn=dies_with_parent(signal.SIGTERM, os.getpid()))\n"
        "print(child.stdout.readline().strip(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    study = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, cwd=REPO,
                           env=subprocess_env(), timeout=60)
    assert study.returncode == -signal.SIGKILL, study.stderr
    child = int(study.stdout.split()[0])
    wait_until(lambda: marker.is_file(), 30, "SIGTERM in the orphaned child", [])
    assert marker.read_text().strip() == "TERM"
    wait_until(lambda: not psutil.pid_exists(child) or gone(psutil.Process(child)), 30, "end of the child", [])
