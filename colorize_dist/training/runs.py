"""Reads runs only from their files (metrics.jsonl, summary.json), so it works on finished, running or copied runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MAX_ROWS = 20  # rows per run's table: intervals are thinned to this many, the last one always kept
PANELS = (("images_per_s", "images/s"), ("mfu", "MFU"), ("memory_mib", "memory MiB"), ("step_s_median", "step s"))


def rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per logging interval (thinned to MAX_ROWS), with the validation of the latest step up to it."""
    intervals = [record for record in records if record["kind"] == "interval"]
    stride = max(1, -(-len(intervals) // MAX_ROWS))
    shown = intervals[::-1][::stride][::-1]
    validations = [record for record in records if record["kind"] == "validation"]
    table = []
    for record in shown:
        latest = [v for v in validations if v["step"] <= record["step"]]
        table.append([record["step"], record["images_per_s"], record["mfu"], record["step_s_median"],
                      record["step_s_max"], record["data_wait_s"], record["memory_mib"], record["checkpoint_block_s"],
                      latest[-1].get("val/psnr_lab") if latest else None])
    return table


def report(run: Path, records: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    from tabulate import tabulate

    memory = next((record["memory"] for record in records if record["kind"] == "interval"), "")
    if summary is None:
        head = f"{run}: still running, or stopped without a summary"
    else:
        best = "none" if summary["best"] is None else f"{summary['best']:.4g}"
        head = (f"{run}: {'finished' if summary['finished'] else 'stopped'} at step {summary['step']} of "
                f"{summary['total_steps']}, {summary['wall_s']:.0f} s, best {summary['best_metric']} {best}, peak "
                f"memory {summary['peak_memory_mib']} MiB ({summary['memory']})")
    table = tabulate(rows(records), ["step", "images/s", "MFU", "step s", "worst step s", "data wait s",
                                     f"memory MiB ({memory})", "checkpoint s", "val psnr_lab"],
                     tablefmt="github", floatfmt=("", ",.1f", ".1%", ".3f", ".3f", ".3f", ",.0f", ".2f", ".2f"),
                     missingval="–")
    return f"{head}\n\n{table}\n"


def plot(histories: list[tuple[Path, list[dict[str, Any]]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 3.2), constrained_layout=True)
    for run, records in histories:
        intervals = [record for record in records if record["kind"] == "interval"]
        steps = [record["step"] for record in intervals]
        for axis, (key, label) in zip(axes, PANELS, strict=False):
            axis.plot(steps, [math.nan if record[key] is None else record[key] for record in intervals],
                      label=run.name)
            axis.set(title=label, xlabel="step")
        validations = [record for record in records if record["kind"] == "validation"]
        axes[-1].plot([record["step"] for record in validations],
                      [record.get("val/psnr_lab", math.nan) for record in validations], marker="o", label=run.name)
        axes[-1].set(title="val psnr_lab (dB)", xlabel="step")
    if not any(record["kind"] == "interval" and record["mfu"] is not None for _, records in histories
               for record in records):
        axes[1].text(0.5, 0.5, "none: no GPU peak (CPU runs)", ha="center", va="center", transform=axes[1].transAxes)
    axes[0].legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
