"""The report's plots (matplotlib, no display needed). A plot is drawn when the study varies its x axis, and
skipped with the reason otherwise. Lines join points that differ only in the x axis (and in what the x axis
decides, such as a batch size set per resolution); the legend names what else differs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colorize_dist.eval.names import LABELS
from colorize_dist.study.collect import PointResult
from colorize_dist.study.plan import format_value, short_names

PLOTS = "plots"  # OUT/plots
RESOLUTION_KEYS = {"data.resolution"}
GPU_KEYS = {"launch.nodes", "launch.gpus_per_node", "launch.tasks_per_node"}


@dataclass(frozen=True)
class Plot:
    title: str
    path: Path | None  # None: skipped
    reason: str = ""  # why it was skipped


def draw_all(results: list[PointResult], axes: list[str], metrics: list[str], folder: Path) -> list[Plot]:
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    context = _Context(results, axes, metrics, folder)
    return [
        context.quality_vs_resolution(),
        context.quality_vs_compute(),
        context.throughput_memory_vs_resolution(),
        context.weak_scaling(),
        context.learning_curves(),
    ]


def determined_by(key: str, x: str, rows: list[dict[str, Any]]) -> bool:
    """Whether every value of `x` goes with one value of `key` (a batch size set per resolution)."""
    pairs = {(repr(row[x]), repr(row[key])) for row in rows}
    return len(pairs) == len({x_value for x_value, _ in pairs})


def group(results: list[PointResult], x: str, axes: list[str], exclude: set[str],
          decided: bool = True) -> dict[str, list[PointResult]]:
    """Results by the values of the other axes, each sorted by `x`: those not excluded and, with `decided`, not
    decided by `x` (a continuous `x`, such as compute, decides everything)."""
    rows = [result.row for result in results]
    others = [axis for axis in axes if axis not in exclude and not (decided and determined_by(axis, x, rows))]
    short = short_names(others)
    groups: dict[str, list[PointResult]] = {}
    for result in results:
        label = ", ".join(f"{short[axis]}={format_value(result.row[axis])}" for axis in others) or "all points"
        groups.setdefault(label, []).append(result)
    return {label: sorted(members, key=lambda result: result.row[x]) for label, members in groups.items()}


class _Context:
    def __init__(self, results: list[PointResult], axes: list[str], metrics: list[str], folder: Path):
        self.results, self.axes, self.folder = results, axes, folder
        self.done = [result for result in results if result.done]
        self.quality = [metric for metric in metrics if metric not in ("fid", "kid", "inception_score")][:2] or \
            metrics[:1]
        self.primary = metrics[0]

    def _save(self, figure, name: str, title: str) -> Plot:
        figure.tight_layout()
        path = self.folder / f"{name}.png"
        figure.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(figure)
        return Plot(title, path)

    def _subplots(self, columns: int, title: str):
        import matplotlib.pyplot as plt

        figure, panels = plt.subplots(1, columns, figsize=(5.2 * columns, 4.0), squeeze=False)
        figure.suptitle(title)
        for panel in panels[0]:
            panel.grid(alpha=0.3)
        return figure, list(panels[0])

    def _lines(self, panel, groups: dict[str, list[PointResult]], x: str, y: Callable[[dict], Any],
               annotate: Callable[[dict], str] | None = None) -> None:
        for label, members in groups.items():
            points = [(member.row[x], y(member.row)) for member in members if y(member.row) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            panel.plot(xs, ys, marker="o", label=label)
            if annotate is not None:
                for member, (px, py) in zip(members, points, strict=False):
                    panel.annotate(annotate(member.row), (px, py), textcoords="offset points", xytext=(4, 4),
                                   fontsize=7)
        if len(groups) > 1:
            panel.legend(fontsize=7)

    def _resolution_axis(self, panel, results: list[PointResult]) -> None:
        resolutions = sorted({result.row["resolution"] for result in results})
        panel.set_xscale("log", base=2)
        panel.set_xticks(resolutions, [f"{value}²" for value in resolutions])
        panel.set_xlabel("resolution")

    def quality_vs_resolution(self) -> Plot:
        title = "Quality vs resolution"
        if len({result.row["resolution"] for result in self.done}) < 2:
            return Plot(title, None, "fewer than two resolutions among the finished points")
        groups = group(self.done, "resolution", self.axes, RESOLUTION_KEYS)
        figure, panels = self._subplots(len(self.quality), title)
        for panel, metric in zip(panels, self.quality, strict=True):
            self._lines(panel, groups, "resolution", lambda row, metric=metric: row[f"final_{metric}"])
            self._resolution_axis(panel, self.done)
            panel.set_ylabel(f"final {LABELS.get(metric, metric)}")
        return self._save(figure, "quality_vs_resolution", title)

    def quality_vs_compute(self) -> Plot:
        title = "Quality vs training compute"
        if len(self.done) < 2:
            return Plot(title, None, "fewer than two finished points")
        groups = group(self.done, "train_flops", self.axes, RESOLUTION_KEYS | {"train.batch_size"}, decided=False)
        figure, panels = self._subplots(1, title)
        panel = panels[0]
        self._lines(panel, groups, "train_flops", lambda row: row[f"final_{self.primary}"],
                    annotate=lambda row: f"{row['resolution']}²")
        from matplotlib.ticker import EngFormatter, LogLocator

        panel.set_xscale("log")
        panel.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50 GFLOP: a few labels per decade
        panel.xaxis.set_major_formatter(EngFormatter(unit="FLOP"))
        panel.xaxis.set_minor_formatter(EngFormatter(unit="FLOP", places=None))
        panel.tick_params(axis="x", which="minor", labelbottom=False)
        panel.set_xlabel("training compute (model FLOPs of G and D)")
        panel.set_ylabel(f"final {LABELS.get(self.primary, self.primary)}")
        return self._save(figure, "quality_vs_compute", title)

    def throughput_memory_vs_resolution(self) -> Plot:
        title = "Throughput and memory vs resolution"
        measured = [result for result in self.done if result.row["images_per_s"]]
        if len({result.row["resolution"] for result in measured}) < 2:
            return Plot(title, None, "fewer than two resolutions among the finished points")
        groups = group(measured, "resolution", self.axes, RESOLUTION_KEYS)
        figure, panels = self._subplots(2, title)
        self._lines(panels[0], groups, "resolution", lambda row: row["images_per_s"])
        panels[0].set_yscale("log")
        panels[0].set_ylabel("images/s (all processes)")
        self._lines(panels[1], groups, "resolution", lambda row: row["peak_memory_mib"])
        memory = {result.row["memory"] for result in measured} - {""}
        panels[1].set_ylabel(f"peak memory (MiB{', ' + ', '.join(sorted(memory)) if memory else ''})")
        for panel in panels:
            self._resolution_axis(panel, measured)
        return self._save(figure, "throughput_memory_vs_resolution", title)

    def weak_scaling(self) -> Plot:
        title = "Weak scaling"
        measured = [result for result in self.done if result.row["images_per_s"]]
        if len({result.row["gpus"] for result in measured}) < 2:
            return Plot(title, None, "one number of GPUs (processes) only")
        groups = {label: members for label, members in
                  group(measured, "gpus", self.axes, GPU_KEYS | {"train.batch_size"}).items()
                  if len({member.row["gpus"] for member in members}) > 1}
        if not groups:
            return Plot(title, None, "no finished points that differ in their number of GPUs only")
        figure, panels = self._subplots(2, title)
        for label, members in groups.items():
            base = members[0].row
            per_process = base["images_per_s"] / base["gpus"]
            gpus = [member.row["gpus"] for member in members]
            panels[0].plot(gpus, [member.row["images_per_s"] for member in members], marker="o", label=label)
            panels[1].plot(gpus, [member.row["images_per_s"] / member.row["gpus"] / per_process for member in members],
                           marker="o", label=label)
            panels[0].plot(gpus, [per_process * count for count in gpus], linestyle=":", color="gray")
        panels[0].set_ylabel("images/s (dotted: perfect scaling)")
        panels[1].set_ylabel("efficiency (images/s per GPU ÷ that of the fewest)")
        panels[1].axhline(1.0, linestyle=":", color="gray")
        panels[1].set_ylim(bottom=0)
        for panel in panels:
            panel.set_xscale("log", base=2)
            counts = sorted({result.row["gpus"] for result in measured})
            panel.set_xticks(counts, [str(count) for count in counts])
            panel.set_xlabel("GPUs (processes)")
            if len(groups) > 1:
                panel.legend(fontsize=7)
        return self._save(figure, "weak_scaling", title)

    def learning_curves(self) -> Plot:
        title = "Learning curves"
        tag = f"val/{self.primary}"
        logged = [result for result in self.results if result.scalars.get(tag) or result.scalars.get("loss/g_total")]
        if not logged:
            return Plot(title, None, "no point has logged a validation or a loss yet")
        figure, panels = self._subplots(2, title)
        for result in logged:
            batch = result.row["batch_size"]
            for panel, name in zip(panels, (tag, "loss/g_total"), strict=True):
                series = result.scalars.get(name, [])
                if series:
                    panel.plot([step * batch for step, _ in series], [value for _, value in series],
                               marker="." if name == tag else None, label=result.point.name)
        panels[0].set_ylabel(f"validation {LABELS.get(self.primary, self.primary)}")
        panels[1].set_ylabel("generator loss (total)")
        panels[1].set_yscale("log")
        for panel in panels:
            panel.set_xlabel("images seen")
            panel.legend(fontsize=7)
        return self._save(figure, "learning_curves", title)
