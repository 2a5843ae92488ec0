"""Timing shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds_per_call(fn: Callable[[], object], *, min_time: float = 0.5, min_calls: int = 3,
                     device: torch.device | None = None) -> float:
    """Wall time per call after one warm-up call, over at least `min_calls` calls and `min_time` seconds."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls
