"""`train.profile=START:STEPS`: a torch.profiler trace of STEPS optimizer steps after step START+1 (which warms the
profiler up), on every rank.

Each rank writes RUN/profile/rank<R>.<time>.pt.trace.json, a Chrome trace that TensorBoard's profiler plugin
(`tensorboard --logdir RUN/profile`), Perfetto (ui.perfetto.dev) and chrome://tracing open; rank 0 prints the
operators that took the most time once, when the window closes. Off (the default), the loop pays one comparison
per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from colorize_dist.training.config import parse_window

PROFILE = "profile"
TOP_OPERATORS = 20


class ProfileWindow:
    """Starts the profiler after step START and stops it after START+1+STEPS (call `step` after every step)."""

    def __init__(self, text: str, run_dir: Path, rank: int, device: torch.device):
        self.start, self.steps = parse_window(text)
        self.folder, self.rank, self.device = run_dir / PROFILE, rank, device
        self.profiler: profile | None = None

    def step(self, step: int) -> None:
        if step == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=True,
                                    schedule=schedule(wait=0, warmup=1, active=self.steps, repeat=1),
                                    on_trace_ready=tensorboard_trace_handler(str(self.folder), f"rank{self.rank}"))
            self.profiler.__enter__()
        elif self.profiler is not None:
            self.profiler.step()  # ends ProfilerStep#N in the trace; the last one writes the trace
            if step == self.start + 1 + self.steps:
                self.profiler.__exit__(None, None, None)
                if self.rank == 0:
                    by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
                    print(f"profile of steps {self.start + 2}-{step} (rank 0; traces in {self.folder}):\n"
                          + self.profiler.key_averages().table(sort_by=by, row_limit=TOP_OPERATORS), flush=True)
                self.profiler = None
