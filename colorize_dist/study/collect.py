"""One row of results per point, from what its trainer wrote: RUN/summary.json (final metrics, peak memory, the
run's device), the TensorBoard logs in RUN/logs (throughput per logging interval, every validation, losses) and
the model costs of its config. Every point of the plan gets a row, whatever its state.

Throughput is the median over logging intervals, leaving out the first (start-up, compilation) when there are
three or more; step time is the global batch over images/s; data wait the share of wall time spent waiting for
the loader.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colorize_dist.eval.names import DIRECTION
from colorize_dist.study.cluster import SLURM_FOLDER, active_jobs
from colorize_dist.study.plan import Plan, Point
from colorize_dist.study.record import DONE, PointState, read_record
from colorize_dist.study.status import point_state
from colorize_dist.training.costs import mfu, point_cost
from colorize_dist.training.summary import read_summary

Series = list[tuple[int, float]]  # (step, value), by step


@dataclass
class PointResult:
    point: Point
    state: PointState
    row: dict[str, Any]  # the results.csv row
    scalars: dict[str, Series] = field(default_factory=dict)  # TensorBoard scalars by tag

    @property
    def done(self) -> bool:
        return self.state.status == DONE


def read_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar the trainer logged to RUN/logs, by tag. A resumed run re-logs steps after its checkpoint;
    the later value of a step wins (TensorBoard's own rule for restarts)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = run_dir / "logs"
    values: dict[str, dict[int, float]] = {}
    folders = sorted({path.parent for path in logs.rglob("events.out.tfevents.*")}) if logs.is_dir() else []
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1,
                                                                "histograms": 1, "audio": 1})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                values.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(by_step.items()) for tag, by_step in values.items()}


def steady(series: Series) -> float | None:
    """The median of a per-interval series, without the first interval when there are three or more."""
    values = [value for _, value in series]
    if len(values) >= 3:
        values = values[1:]
    return statistics.median(values) if values else None


def report_metrics(plan: Plan) -> list[str]:
    """The study's metrics, plus FID when any point validates with Inception weights."""
    metrics = list(plan.study.metrics)
    if "fid" not in metrics and any(point.cfg.train.fid_weights for point in plan.points):
        metrics.append("fid")
    return metrics


def collect(plan: Plan, peak_tflops: float | None = None) -> list[PointResult]:
    uses_slurm = any((read_record(point.run_dir) or {}).get("launcher") == "slurm" for point in plan.points)
    active = active_jobs() if uses_slurm else None
    folder = plan.out / SLURM_FOLDER
    metrics = report_metrics(plan)
    results = []
    for point in plan.points:
        state = point_state(point, folder, active)
        scalars = read_scalars(point.run_dir)
        summary = read_summary(point.run_dir) or {}
        results.append(PointResult(point, state, point_row(plan, point, state, summary, scalars, metrics,
                                                           peak_tflops), scalars))
    return results


def point_row(plan: Plan, point: Point, state: PointState, summary: dict[str, Any], scalars: dict[str, Series],
              metrics: list[str], peak_tflops: float | None) -> dict[str, Any]:
    cfg, cost = point.cfg, point_cost(point.cfg)
    logged_steps = [step for series in scalars.values() for step, _ in series]
    steps = summary.get("step", max(logged_steps, default=0))
    row: dict[str, Any] = {"point": point.name, "status": state.status, "error": state.error or ""}
    row |= {axis: point.value(axis) for axis in plan.axes}
    row |= {"resolution": cfg.data.resolution, "batch_size": cfg.train.batch_size, "gan": cfg.adversarial,
            "gpus": point.num_processes, "nodes": point.launch.nodes,
            "steps": steps, "total_steps": summary.get("total_steps", cfg.train.max_steps or ""),
            "images_seen": steps * cfg.train.batch_size}
    final = summary.get("metrics") or {}
    for metric in metrics:
        series = scalars.get(f"val/{metric}", [])
        row[f"final_{metric}"] = final.get(metric, series[-1][1] if series else None)
        values = [value for _, value in series] + ([row[f"final_{metric}"]] if metric in final else [])
        direction = DIRECTION.get(metric)  # the logs hold float32 values: the exact final one joins them
        row[f"best_{metric}"] = (max(values) if direction == "max" else min(values)) if values and direction else None
    images_per_s = steady(scalars.get("images_per_s", []))
    data_wait = steady(scalars.get("data_wait", []))
    device, precision = summary.get("device", ""), summary.get("mixed_precision", "")
    row |= {
        "images_per_s": images_per_s,
        "step_time_s": cfg.train.batch_size / images_per_s if images_per_s else None,
        "data_wait": data_wait,
        "peak_memory_mib": summary.get("peak_memory_mib"),
        "memory": summary.get("memory", ""),
        "params_generator": cost.params_generator,
        "params_discriminator": cost.params_discriminator,
        "gflop_generator": cost.flops_generator / 1e9,
        "gflop_discriminator": cost.flops_discriminator / 1e9,
        "train_gflop_per_image": cost.flops_per_image / 1e9,
        "train_flops": cost.run_flops(steps),
        "mfu": (mfu(images_per_s, cost.flops_per_image, summary.get("num_processes", point.num_processes), device,
                    precision, peak_tflops) if images_per_s else None),
        "device": device,
        "mixed_precision": precision,
        "wall_s": summary.get("wall_s"),
        "run_dir": str(point.run_dir),
        "log": str(state.log or ""),
    }
    return row
