"""A data error on one rank ends every rank at once, each with the same one line and exit status 2.

A damaged shard that only rank r reads fails on rank r alone; the other ranks would wait for it in their
next collective until a timeout. So the rank that finds the error publishes its message in the job's c10d
store (the TCPStore at MASTER_ADDR:MASTER_PORT that torchrun and `accelerate launch` start) and waits a few
seconds at most for every other rank to see it, then raises as usual (the trainer prints the line and exits
with 2). Every rank runs a watcher thread blocked on that store key (no polling); when another rank's message
arrives it prints the line and ends its process with status 2 at once, wherever its main thread is, typically
inside a collective. Checkpoints are written to a temporary folder and renamed, so ending a process this way
never leaves a half-written one.

Without torch.distributed, with one process, or without MASTER_ADDR/MASTER_PORT, this does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

EXIT_STATUS = 2  # the trainer's status for broken inputs
KEY = "colorize_dist/data_error"
SEEN = "colorize_dist/data_error_seen"
WAIT_FOR_RANKS_S = 5.0
CONNECT_TIMEOUT = datetime.timedelta(seconds=30)
FOREVER = datetime.timedelta(days=365)

_lock = threading.Lock()  # held by whichever of the main thread and the watcher reports first
_reported = False
_watching = False


def _connect():
    """A new client of the job's store, or None when there is no multi-process job to tell."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False, timeout=CONNECT_TIMEOUT)
    except (RuntimeError, ValueError, OSError):
        return None


def watch() -> None:
    """Start this process's watcher (once): another rank's data error ends this process with its line."""
    global _watching
    if _watching:
        return
    store = _connect()
    if store is None:
        return
    _watching = True
    rank = dist.get_rank()
    threading.Thread(target=_watch, args=(store, rank), name="colorize-data-error-watcher", daemon=True).start()


def _watch(store, rank: int) -> None:
    global _reported
    try:
        store.wait([KEY], FOREVER)  # releases the GIL while it waits
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
        store = _connect()
        if store is None:
            return
        try:
            store.compare_set(KEY, "", f"{dist.get_rank()}\n{message}")  # the first error wins
            deadline = time.monotonic() + WAIT_FOR_RANKS_S
            while store.add(SEEN, 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        except Exception:  # the others then fail in their next collective instead
            pass


def program_name() -> str:
    """The command's name for the message prefix (`train`, `eval`), as the failing rank's command prints it."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "colorize-dist"
    if name in ("__main__", "colorize-dist", "colorize_dist", "cli"):
        name = next((word for word in sys.argv[1:] if not word.startswith("-")), name)
    return name
