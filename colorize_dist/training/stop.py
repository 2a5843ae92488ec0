"""Stop requests: SIGTERM or SIGUSR1 (what Slurm sends before a time limit or preemption), or `request_stop()`.

A request only sets a flag. The loop calls `any_rank` at every step boundary, which all-reduces the flags so
that every rank takes the same decision at the same step: save a checkpoint, then return EXIT_RESUMABLE.
A caller that runs `colorize_dist.train.main` in its own process (e.g. a submitit job whose `checkpoint()`
is invoked on preemption) calls `request_stop()` instead of sending a signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

EXIT_RESUMABLE = 75  # sysexits' EX_TEMPFAIL: stopped early with a checkpoint; `--resume auto` continues
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested = threading.Event()


def request_stop() -> None:
    """Ask the running training loop to checkpoint at the next step boundary and return EXIT_RESUMABLE."""
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


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


def any_rank(*flags: bool | torch.Tensor, device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks, in one all-reduce; tensors may be 0-d booleans still on the device."""
    values = torch.stack([torch.as_tensor(flag, device=device).reshape(()) for flag in flags]).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]
