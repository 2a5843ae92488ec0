"""What a run reports about itself: the clock (training time, images/s, the share spent waiting for data), the
line printed at the end, and RUN/summary.json for studies and scripts.

summary.json is written atomically by rank 0 at the end of `train()`, after every rank has contributed its peak
memory (one all-reduce), so all ranks must call `write_summary`. Throughput over time is in the TensorBoard logs
(`images_per_s`, `data_wait` per logging interval); this file holds what the logs do not:

    {"finished": true, "step": 300, "total_steps": 300, "images_seen": 4800, "batch_size": 16,
     "best_metric": "psnr_lab", "best": 23.1, "metrics": {"psnr_lab": 23.0, ...},   # the last validation
     "peak_memory_mib": 812.5, "memory": "peak RSS", "device": "cpu", "num_processes": 1,
     "mixed_precision": "no", "wall_s": 41.2, "worse_than_gray": null, "written": "2026-11-21T19:20:03+00:00"}

`memory` says what `peak_memory_mib` measures: on GPUs the most torch's allocator reserved plus the device memory
outside torch at the end (CUDA context, DALI's pool, nvJPEG: what a batch size must fit beside), on CPUs the peak
resident set size of the process; the largest over ranks either way.
`wall_s` is the run's training time over all its starts (each resume adds to what its checkpoint recorded) and
`images_seen` the samples read over all of them (padding copies not counted). `worse_than_gray` is null, or the line
saying that the last validation scored under the gray baseline (`divergence`): the exports then predict worse than
no colour at all.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from colorize_dist.collectives import max_over_ranks
from colorize_dist.files import atomic_write
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import Config

if TYPE_CHECKING:
    from colorize_dist.training.build import State  # build.py makes the loop's Clock

SUMMARY = "summary.json"


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured) of this process. On a GPU: the most torch's caching allocator held, plus what the
    device holds outside it now (the CUDA context, DALI's pool, nvJPEG, cuDNN/cuBLAS handles, other processes),
    so that a batch "fits" only if everything on the device fits. On a CPU: the peak resident set size."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
        return ((torch.cuda.max_memory_reserved(device) + outside_torch) / 2**20,
                "cuda max_memory_reserved + device memory outside torch")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def write_summary(accelerator: Accelerator, cfg: Config, run_dir: Path, progress: Progress,
                  metrics: dict[str, float], *, total_steps: int, finished: bool, wall_s: float,
                  worse_than_gray: str | None = None) -> None:
    """RUN/summary.json (see the module docstring); call on every rank."""
    memory_mib, memory_kind = peak_memory(accelerator.device)
    peak = max_over_ranks(memory_mib, accelerator.device)
    if not accelerator.is_main_process:
        return
    summary: dict[str, Any] = {
        "finished": finished,
        "step": progress.step,
        "total_steps": total_steps,
        "images_seen": progress.images_seen,
        "batch_size": cfg.train.batch_size,
        "best_metric": cfg.train.best_metric,
        "best": progress.best,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "peak_memory_mib": round(float(peak), 1),
        "memory": memory_kind,
        "device": device_name(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        "wall_s": round(wall_s, 2),
        "worse_than_gray": worse_than_gray,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(run_dir / SUMMARY, json.dumps(summary, indent=1) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """RUN/summary.json, or None when the run has not written one (not finished, or older than summaries)."""
    path = Path(run_dir) / SUMMARY
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class Clock:
    """Wall time (this start's, and the run's over all its starts), and the share spent waiting for data."""

    def __init__(self, before: float = 0.0):
        self.before = before  # the run's training time before this start
        self.start = self.lap_start = time.perf_counter()
        self.waiting = 0.0

    def elapsed(self) -> float:
        """Seconds since this start."""
        return time.perf_counter() - self.start

    def total(self) -> float:
        """The run's training time over all its starts."""
        return self.before + self.elapsed()

    def wait(self, batches: Iterator) -> Iterator:
        while True:
            before = time.perf_counter()
            batch = next(batches)
            self.waiting += time.perf_counter() - before
            yield batch

    def lap(self, images: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.lap_start
        rates = {"images_per_s": images / elapsed, "data_wait": self.waiting / elapsed}
        self.lap_start, self.waiting = now, 0.0
        return rates


def summary(state: State) -> str:
    cfg, progress, metrics = state.cfg, state.progress, state.metrics
    minutes, seconds = divmod(round(state.clock.elapsed()), 60)
    best = "none" if progress.best is None else f"{progress.best:.4g}"  # None: every validation was NaN
    scores = (f"val psnr_lab {metrics['psnr_lab']:.2f} dB (gray baseline {metrics['psnr_lab_gray']:.2f} dB), "
              f"best {cfg.train.best_metric} {best}" if metrics else "not validated")
    worse = "; its last validation scored under the gray baseline (summary.json: worse_than_gray)" if \
        state.divergence.worse_than_gray else ""
    return (f"{'stopped' if state.stopped else 'done'} at step {progress.step} after {minutes}m{seconds:02d}s: "
            f"{scores}{worse}; {progress.nonfinite} steps skipped for NaN/inf; run dir {state.run_dir}")
