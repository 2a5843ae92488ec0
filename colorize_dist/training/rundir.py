"""One training run per run directory at a time.

Two runs writing the same checkpoints, samples and exports corrupt each other (the first dies reading a
safetensors file the second is rewriting). Rank 0 holds an exclusive `flock` on RUN/.lock for the whole run;
the lock dies with the process, so a killed run never leaves the directory blocked. The file says who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator

from colorize_dist.collectives import broadcast_from_rank0
from colorize_dist.config import ConfigError
from colorize_dist.files import first_line, writable_directory

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock (rank 0) while the block runs; ConfigError on every rank if another run holds it."""
    descriptor, problem = None, None
    if accelerator.is_main_process:
        path = run_dir / LOCK_NAME
        try:
            writable_directory(run_dir, "--run-dir")  # not a file, writable, not on a read-only file system
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            problem = first_line(exc)
        else:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            except BlockingIOError:
                holder = path.read_text().strip() or "another process"
                problem = (f"run dir {run_dir} is in use by another training run ({holder}); wait for it to end or "
                           "pass another --run-dir")
                os.close(descriptor)
                descriptor = None
    (problem,) = broadcast_from_rank0([problem])  # every rank stops alike, before any other collective
    if problem is not None:
        raise ConfigError(problem)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock
