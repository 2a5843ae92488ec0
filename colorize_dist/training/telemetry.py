"""What a run reports about itself per logging interval, from every rank: RUN/metrics.jsonl, the trackers, the
progress bar, and a warning naming a straggling rank.

Each rank times its steps (`tick` once per step), its data wait (the loop's `Clock`) and the forward passes of
its networks (forward hooks: the one part of a step that waits for no other rank, so it shows a slow rank's own
compute; DDP lets the fast ranks wait inside the backward's gradient all-reduce, which makes every rank's step
time the same). On a logging step the ranks exchange one row of numbers each in the one collective that step
makes anyway, which also carries the stop flags (see `loop.stop_reason`). Rank 0 writes one line to
RUN/metrics.jsonl per interval:

    {"kind": "interval", "step": 20, "wall_s": 9.81, "images_per_s": 41.3, "mfu": null,
     "step_s_median": 0.094, "step_s_max": 0.131, "data_wait_s": 0.002, "forward_s": 0.031,
     "memory_mib": 905.2, "memory": "rss", "checkpoint_block_s": 0.0, "data_wait": 0.02, "loss/g_total": 0.61,
     "lr": 0.001, ...,
     "ranks": [{"rank": 0, "host": "node1", "images_per_s": 20.7, "step_s_median": 0.093, "step_s_max": 0.131,
                "data_wait_s": 0.001, "forward_s": 0.030, "allocated_mib": null, "reserved_mib": null,
                "device_used_mib": null, "rss_mib": 905.2}, ...]}

Top level, over the job: images/s of all ranks together; MFU (training/costs.py's FLOPs per image over the GPUs'
dense peak: train.peak_tflops, else the data sheet of a known GPU; null on CPUs and unknown GPUs); the slowest
rank's median and worst step time (seconds), data wait and forward time (seconds per step); the largest memory
figure of any rank (`memory` says which: device-wide used memory on GPUs, resident set size on CPUs); and the
seconds checkpoints held the step since the previous line; `data_wait`, rank 0's share of the interval spent
waiting for data (what studies read from TensorBoard). Per rank: the same measured on that rank, with
torch's allocated and reserved memory and the device-wide used memory (the CUDA context, DALI's pool, nvJPEG and
other processes included) on GPUs, or the resident set size on CPUs. Validation adds
`{"kind": "validation", "step": ..., "val/psnr_lab": ...}` lines. Keys are only ever added, never renamed.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from colorize_dist.collectives import all_gather_objects, all_gather_rows
from colorize_dist.training.costs import PointCost

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
RANK_FIELDS = ("images_per_s", "step_s_median", "step_s_max", "data_wait_s", "forward_s", "allocated_mib",
               "reserved_mib", "device_used_mib", "rss_mib")
MIN_STRAGGLER_GAP_S = 0.005  # a rank is not called slow for less than this many seconds per step over the median


def memory_now(device: torch.device) -> dict[str, float | None]:
    """This process's memory in MiB: torch's allocated and reserved and the device-wide used memory on a GPU,
    the resident set size on a CPU (the others None)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
                "reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
                "device_used_mib": (total - free) / 2**20, "rss_mib": None}
    return {"allocated_mib": None, "reserved_mib": None, "device_used_mib": None,
            "rss_mib": psutil.Process().memory_info().rss / 2**20}


class ForwardTimer:
    """Seconds spent in the forward passes of some modules (hooks; CUDA events on a GPU, read on logging steps
    only, so the step makes no host sync for them)."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list[tuple[Any, Any]] = []
        self.started: list[Any] = []
        for module in modules:
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(self._stop)

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module: nn.Module, args: Any) -> None:
        self.started.append(self._now())

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        start, end = self.started.pop(), self._now()
        if self.cuda:
            self.events.append((start, end))
        else:
            self.seconds += end - start

    def take(self) -> float:
        """The seconds since the last call (waits for the device's recorded passes on a GPU)."""
        if self.events:
            self.events[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000
            self.events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclass
class Stragglers:
    """Which rank is slower than the others' median by more than `margin` (a fraction) in forward time (compute)
    or data wait (data) for `intervals` logging intervals in a row; `update` returns the warning lines, one per
    rank and only when what is slow about it changes."""

    margin: float
    intervals: int
    hosts: list[str]
    streaks: dict[int, tuple[str | None, int]] = field(default_factory=dict)
    reported: dict[int, str | None] = field(default_factory=dict)

    def update(self, ranks: list[dict[str, Any]]) -> list[str]:
        if len(ranks) < 2:
            return []
        lines = []
        for rank, row in enumerate(ranks):
            others = [other for index, other in enumerate(ranks) if index != rank]
            slow = {}
            for what, key in (("compute", "forward_s"), ("data", "data_wait_s")):
                median = statistics.median(other[key] for other in others)
                if row[key] > median * (1 + self.margin) and row[key] - median > MIN_STRAGGLER_GAP_S:
                    slow[what] = (row[key], median)
            state = " and ".join(slow) or None
            previous, count = self.streaks.get(rank, (None, 0))
            count = count + 1 if state == previous else 1
            self.streaks[rank] = (state, count)
            if count >= self.intervals and state != self.reported.get(rank):
                self.reported[rank] = state
                if state is not None:
                    detail = "; ".join(f"{'forward' if what == 'compute' else 'data wait'} {value:.3f} s per step "
                                       f"against the others' median {median:.3f} s"
                                       for what, (value, median) in slow.items())
                    lines.append(f"straggler: rank {rank} on {self.hosts[rank]} is slow in {state} for "
                                 f"{count} logging intervals ({detail})")
        return lines


class Telemetry:
    """One rank's step timings between logging steps, their exchange and (rank 0) RUN/metrics.jsonl."""

    def __init__(self, run_dir: Path, device: torch.device, *, rank: int, world_size: int,
                 forward_modules: Sequence[nn.Module], cost: PointCost | None, peak_flops: float | None,
                 straggler_margin: float, straggler_intervals: int):
        self.path = run_dir / METRICS
        self.device, self.rank, self.world_size = device, rank, world_size
        self.main = rank == 0
        self.cost, self.peak_flops = cost, peak_flops
        self.forward = ForwardTimer(forward_modules, device)
        self.step_times: list[float] = []
        self.last = time.perf_counter()
        self.checkpoint_block_s = 0.0
        hosts = all_gather_objects(socket.gethostname())  # once per start: host names do not change
        self.stragglers = Stragglers(straggler_margin, straggler_intervals, hosts)

    def tick(self) -> None:
        """One step done (every step, every rank)."""
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now

    def blocked(self, seconds: float) -> None:
        """A checkpoint held the step for `seconds`."""
        self.checkpoint_block_s += seconds

    def interval(self, rates: dict[str, float], images: int, flags: Sequence[bool], adversarial: bool,
                 ) -> tuple[list[bool], dict[str, Any]]:
        """At a logging step on every rank: this rank's row and `flags` go to every rank in one all-gather.
        Returns each flag OR-ed over the ranks, and the job-wide record (also on ranks other than 0); `adversarial`:
        whether the interval's steps trained D (for the FLOPs)."""
        steps = self.step_times or [0.0]
        per_step = sum(steps) / len(steps)
        row = {"images_per_s": images / self.world_size / max(sum(steps), 1e-9),
               "step_s_median": statistics.median(steps), "step_s_max": max(steps),
               "data_wait_s": rates["data_wait"] * per_step, "forward_s": self.forward.take() / len(steps),
               **memory_now(self.device)}
        self.step_times = []
        mine = [float(flag) for flag in flags] + [math.nan if row[key] is None else row[key] for key in RANK_FIELDS]
        table = all_gather_rows(mine)
        any_flags = [any(values[index] > 0 for values in table) for index in range(len(flags))]
        ranks = [{"rank": rank, "host": self.stragglers.hosts[rank],
                  **{key: None if math.isnan(value) else value
                     for key, value in zip(RANK_FIELDS, values[len(flags):], strict=True)}}
                 for rank, values in enumerate(table)]
        flops = None
        if self.cost is not None:
            flops = self.cost.flops_per_image if adversarial else 3 * self.cost.flops_generator
        record = job_record(ranks, flops, self.peak_flops, self.device)
        record["checkpoint_block_s"], self.checkpoint_block_s = self.checkpoint_block_s, 0.0
        record["ranks"] = ranks
        if self.main:
            for line in self.stragglers.update(ranks):
                log.warning(line)
        return any_flags, record

    def write(self, record: dict[str, Any]) -> None:
        """One line of RUN/metrics.jsonl (rank 0; flushed, so `tail -f` and `colorize-dist runs` see it at once)."""
        if self.main:
            with self.path.open("a") as file:
                file.write(json.dumps(significant(record)) + "\n")


def significant(value: Any, digits: int = 4) -> Any:
    """`value` with its floats to `digits` significant digits (what the measurements hold; shorter lines)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: significant(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [significant(item, digits) for item in value]
    return value


def job_record(ranks: list[dict[str, Any]], flops_per_image: float | None, peak_flops: float | None,
               device: torch.device) -> dict[str, Any]:
    """The job-wide figures of one interval from the ranks' rows (see the module docstring)."""
    images_per_s = sum(row["images_per_s"] for row in ranks)
    memory_key = "device_used_mib" if device.type == "cuda" else "rss_mib"
    mfu = (images_per_s * flops_per_image / (len(ranks) * peak_flops)
           if flops_per_image and peak_flops else None)
    return {"images_per_s": images_per_s, "mfu": mfu,
            **{key: max(row[key] for row in ranks) for key in ("step_s_median", "step_s_max", "data_wait_s",
                                                               "forward_s")},
            "memory_mib": max(row[memory_key] for row in ranks),
            "memory": "device used" if device.type == "cuda" else "rss"}


def status(record: dict[str, Any]) -> dict[str, str]:
    """The few figures the progress bar shows."""
    shown = {label: f"{record[key]:.3g}" for key, label in (("loss/g_total", "G"), ("loss/d_total", "D"))
             if key in record}
    shown |= {"img/s": f"{record['images_per_s']:.3g}", "step": f"{record['step_s_median']:.3g}s",
             "wait": f"{record['data_wait_s']:.2g}s", "mem": f"{record['memory_mib'] / 1024:.3g}G"}
    if record["mfu"] is not None:
        shown["mfu"] = f"{record['mfu']:.1%}"
    return shown


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's job-wide numbers, for TensorBoard / W&B."""
    return {key: value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "wall_s")}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of RUN/metrics.jsonl (none if there is no file); a line cut short by a kill is skipped."""
    try:
        lines = (Path(run_dir) / METRICS).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
