"""A data error on one rank ends every rank at once, each with the same one line and exit status 2.

A damaged shard that only rank r reads fails on rank r alone; the other ranks would wait for it in their
next collective until a timeout. So the rank that finds the error publishes its message in the job's c10d
store (the TCPStore at MASTER_ADDR:MASTER_PORT that torchrun and `accelerate launch` start) and waits a few
seconds at most for every other rank to see it, then raises as usual (the trainer prints the line and exits
with 2). Every rank runs a watcher thread blocked on its own wake-up key (no polling); when another rank's message
arrives it prints the line and ends its process with status 2 at once, wherever its main thread is, typically
inside a collective. A process ends its watcher when it exits (`stop_watching`, at exit): a watcher still waiting when
rank 0 (which hosts the store) exits is woken by the broken connection, and a thread woken while the interpreter
shuts down aborts the whole process ("terminate called without an active exception"). Checkpoints are written
to a temporary folder and renamed, so ending a process this way never leaves a half-written one.

Without torch.distributed, with one process, or without MASTER_ADDR/MASTER_PORT, this does nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import threading
import time
from pathlib import Path

from colorize_dist import collectives

EXIT_STATUS = 2  # the trainer's status for broken inputs
KEY = "colorize_dist/data_error"
SEEN = "colorize_dist/data_error_seen"
WAKE = "colorize_dist/data_error_wake/"  # + rank: set after KEY by the publisher, or by the rank itself to stop
WAIT_FOR_RANKS_S = 5.0
CONNECT_TIMEOUT = datetime.timedelta(seconds=30)
STOP_CONNECT_TIMEOUT = datetime.timedelta(seconds=5)  # at exit, rank 0's node may be gone
FOREVER = datetime.timedelta(days=365)

_lock = threading.Lock()  # held by whichever of the main thread and the watcher reports first
_reported = False
_watcher: tuple[threading.Thread, int] | None = None  # and this process's rank


def _connect(timeout: datetime.timedelta = CONNECT_TIMEOUT):
    """A new client of the job's store, or None when there is no store (no multi-process job, or it is gone)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return collectives.store_client(host, int(port), timeout)
    except (RuntimeError, ValueError, OSError):
        return None


def _in_job() -> bool:
    return collectives.world_size() > 1


def watch() -> None:
    """Start this process's watcher (once): another rank's data error ends this process with its line."""
    global _watcher
    if _watcher is not None or not _in_job() or (store := _connect()) is None:
        return
    rank = collectives.rank()
    thread = threading.Thread(target=_watch, args=(store, rank), name="colorize-data-error-watcher", daemon=True)
    thread.start()
    _watcher = (thread, rank)
    atexit.register(stop_watching)


def stop_watching(timeout_s: float = 10.0) -> None:
    """End this process's watcher; other ranks' watchers keep watching."""
    global _watcher
    if _watcher is None:
        return
    thread, rank = _watcher
    _watcher = None
    if thread.is_alive() and (store := _connect(STOP_CONNECT_TIMEOUT)) is not None:
        with contextlib.suppress(Exception):  # the store is gone: the watcher has woken already
            store.set(WAKE + str(rank), "stop")
    thread.join(timeout_s)


def _watch(store, rank: int) -> None:
    global _reported
    try:
        store.wait([WAKE + str(rank)], FOREVER)  # releases the GIL while it waits
        if not store.check([KEY]):  # stop_watching
            return
        publisher, _, message = store.get(KEY).decode().partition("\n")
    except Exception:  # the store went away: the job is ending anyway
        return
    if int(publisher) == rank:
        return
    with _lock:  # if this process is already failing with its own error, let that one be its line
        if not _reported:
            _reported = True
            # On a line of its own: a progress bar may be half-drawn on this one.
            print(f"\n{program_name()}: {message}", file=sys.stderr, flush=True)
            _tell_seen(store)
            os._exit(EXIT_STATUS)
    _tell_seen(store)


def _tell_seen(store) -> None:
    with contextlib.suppress(Exception):  # best effort: the publisher stops waiting after a few seconds
        store.add(SEEN, 1)


def publish(message: str) -> None:
    """Tell every other rank about this rank's data error, and give them a moment to stop; then the caller raises."""
    global _reported
    with _lock:
        if _reported:
            return
        _reported = True
        if not _in_job() or (store := _connect()) is None:
            return
        try:
            store.compare_set(KEY, "", f"{collectives.rank()}\n{message}")  # the first error wins
            for rank in range(collectives.world_size()):
                store.set(WAKE + str(rank), "error")
            deadline = time.monotonic() + WAIT_FOR_RANKS_S
            while store.add(SEEN, 0) < collectives.world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception:  # the others then fail in their next collective instead
            pass


def program_name() -> str:
    """The command's name for the message prefix (`train`, `eval`), as the failing rank's command prints it."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "colorize-dist"
    if name in ("__main__", "colorize-dist", "colorize_dist", "cli"):
        name = next((word for word in sys.argv[1:] if not word.startswith("-")), name)
    return name
