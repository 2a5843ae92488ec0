"""Stop requests: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or preemption), the death of the
process that launched this one, or `request_stop()`.

A request only sets a flag. The loop reads the flags of every rank in one all-reduce on its logging steps
(train.log_every), so every rank takes the same decision at the same step: save a checkpoint, then return
EXIT_RESUMABLE. A request is thus acted on within train.log_every steps. Code that calls
`colorize_dist.training.loop.train` in its own process (not through a launcher it could signal) calls
`request_stop()` from another thread instead.

A launcher (`accelerate launch`, torchrun) that is killed — by the OOM killer, or a `kill -9` of a job's main
process — cannot stop its trainers: torch elastic starts each in a session of its own, so they would train on as
orphans, holding their GPUs. `watch_launcher` notices the parent's death (its process id changes when the process
is re-parented) and requests a stop, as SIGTERM would: the ranks checkpoint at the next logging step if all are
still there, and end with the lost-rank line otherwise (see `peers`). PR_SET_PDEATHSIG is not used for this: it
fires when the parent *thread* that started the process ends, which a launcher may do while it lives on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

EXIT_RESUMABLE = 75  # sysexits' EX_TEMPFAIL: stopped early with a checkpoint; `--resume auto` continues
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_POLL_S = 1.0
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_STEP_ID")  # torchrun/accelerate, DeepSpeed, srun

_requested = threading.Event()
_launcher_lost = threading.Event()
_watching = False


def request_stop() -> None:
    """Ask the running training loop to checkpoint at the next step boundary and return EXIT_RESUMABLE."""
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set() or _launcher_lost.is_set()


def launcher_lost() -> bool:
    """Whether the process that started this one has died (see `watch_launcher`)."""
    return _launcher_lost.is_set()


def watch_launcher() -> None:
    """For a rank started by a launcher (torchrun, `accelerate launch`, DeepSpeed's, srun): request a stop if its
    parent dies, checked every LAUNCHER_POLL_S in a daemon thread; one already orphaned at start (its parent died
    before it got here) stops at once. A trainer started by hand (`python train.py`, under nohup) is not watched:
    its shell may end while it trains on."""
    global _watching
    if _watching or not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return
    _watching = True
    parent = os.getppid()
    if parent == 1:
        _launcher_lost.set()
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_S)
        _launcher_lost.set()

    threading.Thread(target=watch, name="colorize-launcher-watcher", daemon=True).start()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn STOP_SIGNALS into stop requests while the loop runs; the previous handlers come back afterwards."""
    _requested.clear()
    previous = {sig: signal.signal(sig, lambda signum, frame: request_stop()) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
