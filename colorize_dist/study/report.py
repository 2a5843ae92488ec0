"""Collect a study's results from its points' run dirs; every point is listed, whatever its state.

Reads only files (and Slurm's queue when points ran there), so it runs anywhere the output dir is readable.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timezone
from typing import Any

from tabulate import tabulate

from colorize_dist.eval.names import LABELS
from colorize_dist.files import atomic_write
from colorize_dist.study.collect import PointResult, collect, report_metrics
from colorize_dist.study.plan import Plan, format_value, short_names
from colorize_dist.study.plots import PLOTS, Plot, draw_all
from colorize_dist.study.record import DONE

RESULTS, REPORT = "results.csv", "report.md"


def write_report(plan: Plan, peak_tflops: float | None = None) -> list[PointResult]:
    results = collect(plan, peak_tflops)
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write(plan.out / RESULTS, results_csv(results))
    plots = draw_all(results, plan.axes, report_metrics(plan), plan.out / PLOTS)
    atomic_write(plan.out / REPORT, markdown(plan, results, plots))
    return results


def summary_line(results: list[PointResult]) -> str:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.state.status] = counts.get(result.state.status, 0) + 1
    return f"{len(results)} points: " + ", ".join(f"{count} {status}" for status, count in counts.items())


def results_csv(results: list[PointResult]) -> str:
    columns = list(dict.fromkeys(key for result in results for key in result.row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({key: "" if value is None else value for key, value in result.row.items()})
    return text.getvalue()


# --- report.md ---------------------------------------------------------------------------------------------------

def markdown(plan: Plan, results: list[PointResult], plots: list[Plot]) -> str:
    study, metrics = plan.study, report_metrics(plan)
    devices = sorted({result.row["device"] for result in results if result.row["device"]})
    lines = [f"# Study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"- study file: `{plan.path}`; training config: `{study.config}`; budget: {budget_text(plan)}",
        f"- {summary_line(results)}; output: `{plan.out}`",
        f"- device: {', '.join(devices) or 'not run yet'}; written "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "## Quality",
        "",
        "Validation metrics of the EMA generator at the end of training, the best over all validations in "
        "parentheses.",
        "",
    ]
    axes = plan.axes
    short = short_names(axes)
    header = ["point", *[short[axis] for axis in axes], "status", "steps",
              *[LABELS.get(metric, metric) for metric in metrics]]
    rows = [[result.point.name, *[format_value(result.row[axis]) for axis in axes], result.state.status,
             steps_text(result.row), *[metric_text(result.row, metric) for metric in metrics]] for result in results]
    lines += [*table(header, rows), "", "## Cost and throughput", ""]
    header = ["point", "processes", "batch", "params G / D", "FLOPs/image", "images/s", "step time", "data wait",
              "peak memory", "MFU", "compute", "wall time"]
    rows = [[
        result.point.name, str(result.row["gpus"]), str(result.row["batch_size"]),
        f"{count(result.row['params_generator'])} / {count(result.row['params_discriminator'])}",
        flops(result.row["train_gflop_per_image"] * 1e9),
        number(result.row["images_per_s"], "{:.3g}"),
        duration(result.row["step_time_s"]),
        percent(result.row["data_wait"]),
        number(result.row["peak_memory_mib"], "{:,.0f} MiB"),
        percent(result.row["mfu"]),
        flops(result.row["train_flops"]),
        number(result.row["wall_s"], "{:.0f} s"),
    ] for result in results]
    lines += table(header, rows)
    trouble = [result for result in results if result.state.status != DONE]
    if trouble:
        lines += ["", "## Failed and unfinished points", ""]
        lines += table(["point", "status", "error", "log"],
                       [[result.point.name, result.state.status, result.state.error or "",
                         f"`{result.state.log}`" if result.state.log else ""] for result in trouble])
    lines += ["", "## Plots", ""]
    for plot in plots:
        if plot.path is not None:
            lines += [f"### {plot.title}", "", f"![{plot.title}]({plot.path.relative_to(plan.out).as_posix()})", ""]
    skipped = [f"{plot.title.lower()} ({plot.reason})" for plot in plots if plot.path is None]
    if skipped:
        lines += [f"Not drawn: {'; '.join(skipped)}.", ""]
    lines += ["## How these are measured", "", *NOTES, ""]
    return "\n".join(lines)


NOTES = [
    "- Metrics: the trainer's validation (`colorize_dist.eval.metrics`) on the validation split; FID only when "
    "`train.fid_weights` is set.",
    "- images/s: all processes together, the median over logging intervals (the first left out when there are "
    "three or more); step time: global batch / images/s; data wait: share of the time spent waiting for the "
    "loader.",
    "- Weak-scaling efficiency: images/s per GPU (process) over that of the point with the fewest, among points "
    "that differ only in their number of GPUs and batch size.",
    "- Peak memory: the largest over processes; on GPUs the most torch reserved plus the device memory outside "
    "torch (CUDA context, DALI's pool, nvJPEG), on CPUs the peak resident set size.",
    "- FLOPs: model FLOPs per training image, 3·G + 8·D forward FLOPs (2 per multiply-add; the perceptual VGG16 "
    "is not counted); compute: that × images seen; MFU: images/s × FLOPs per image / (GPUs × dense peak at the "
    "run's precision). See `colorize_dist/training/costs.py`.",
    "- Wall time: the training loop's, in the last start of the run. Every point is in `results.csv`, with its run "
    "dir and log.",
]


def budget_text(plan: Plan) -> str:
    given = plan.study.budget.given()
    if given is None:
        return "each point's own train.max_steps or epochs"
    kind, amount = given
    if kind == "flops":
        return f"{amount:.3g} training FLOPs per point"
    return f"{int(amount):,} {kind} per point"


def steps_text(row: dict[str, Any]) -> str:
    return f"{row['steps']}/{row['total_steps']}" if row["total_steps"] else str(row["steps"])


def metric_text(row: dict[str, Any], metric: str) -> str:
    final, best = row.get(f"final_{metric}"), row.get(f"best_{metric}")
    if final is None:
        return "—"
    style = "{:.4f}" if metric.startswith(("ssim", "lpips", "kid")) else "{:.2f}"
    text = style.format(final)
    return f"{text} ({style.format(best)})" if best is not None else text


def number(value: float | None, style: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else style.format(value)


def percent(value: float | None) -> str:
    return number(None if value is None else 100 * value, "{:.1f}%")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def flops(value: float) -> str:
    """FLOPs with an SI prefix: 4.2 MFLOP, 1.3 EFLOP."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}FLOP"
    return f"{value:.3g} FLOP"


def count(value: int) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.1f} k" if value >= 1e3 else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub markdown table; cells as given (no number parsing), `|` escaped, one line each."""
    def cell(value: str) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    text = tabulate([[cell(value) for value in row] for row in rows], headers=[cell(value) for value in header],
                    tablefmt="github", disable_numparse=True)
    return text.splitlines()
