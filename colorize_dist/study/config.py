"""The study file: a training config, the points to run (named points × a grid of overrides), a budget, metrics.

    config: seed000                 # every point starts from this training config (preset or path)
    overrides: {data.shards: /data/celeba-hq, train.validate_every: 500}   # for every point
    points:                         # named points (optional) ...
      - {name: U-Net(depth=3), overrides: {loss.theta: 0.0}}
      - {name: U-Net(depth=3) + GAN, overrides: {loss.theta: 0.2}}
      - {name: reference, overrides: {data.resolution: 256}, cross: false}   # not crossed with the grid
    grid:                           # ... each crossed with every combination of these (optional; without
      data.resolution: [64, 128]    # crossed points, every combination is a point)
    budget: {epochs: 100}           # one of steps | epochs | images | flops
    metrics: [psnr_lab, ssim_lab, psnr_rgb, ssim_rgb]
    launch: {gpus_per_node: 8, partition: gpu, time: "24:00:00"}   # SlurmResources, as `colorize-dist submit`'s

Override keys are the trainer's dotted keys (`model.generator.depth`) or `launch.*` (nodes, gpus_per_node,
tasks_per_node, … per point: a node ladder). `launch.time` is text in one of Slurm's formats, quoted in YAML
(which reads an unquoted 24:00:00 as the number 86400). A value of `???` must be given on the command line
(`colorize-dist study run FILE data.shards=/data/ffhq`). A study file may start from another with `base:`
(config.py's composition), and is named by its path or, for the shipped ones, by its name (`smoke`).
Unknown keys and wrong types stop with one line, before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colorize_dist.config import ConfigError, load_config, preset_dir, read_yaml
from colorize_dist.eval.names import INCEPTION_METRICS, LPIPS_METRICS, PER_IMAGE_METRICS
from colorize_dist.launch.resources import STUDY_PREFIX, TIME_FORMATS, SlurmResources

STUDIES = "studies"  # the shipped study files: configs/studies/*.yaml (colorize_dist/configs/studies installed)
DEFAULT_METRICS = ["psnr_lab", "ssim_lab", "psnr_ab", "ssim_ab", "psnr_rgb", "ssim_rgb"]
LAUNCH_PREFIX = STUDY_PREFIX  # launch.<field> keys set the points' SlurmResources
TIME_KEY = f"{LAUNCH_PREFIX}time"


@dataclass
class BudgetConfig:
    """How long every point trains; at most one is set (none: the training config's own max_steps or epochs).

    Images and FLOPs are rounded up to whole optimizer steps of each point's global batch; FLOPs are counted
    as `colorize_dist.training.costs` says (model FLOPs of G and D, forward and backward).
    """

    steps: int | None = None
    epochs: int | None = None
    images: int | None = None
    flops: float | None = None

    def given(self) -> tuple[str, float] | None:
        chosen = [(item.name, getattr(self, item.name)) for item in dataclasses.fields(self)
                  if getattr(self, item.name) is not None]
        return chosen[0] if chosen else None

    def validate(self) -> None:
        chosen = [item.name for item in dataclasses.fields(self) if getattr(self, item.name) is not None]
        if len(chosen) > 1:
            raise ConfigError(f"budget: give one of steps, epochs, images or flops, got {', '.join(chosen)}")
        if chosen and getattr(self, chosen[0]) <= 0:
            raise ConfigError(f"budget.{chosen[0]} must be positive, got {getattr(self, chosen[0])}")


@dataclass
class PointConfig:
    name: str = ""  # the point's label in the report (its run dir is a file-safe form of it)
    overrides: dict[str, Any] = field(default_factory=dict)
    cross: bool = True  # crossed with every grid combination; false: a point of its own (a reference point)


@dataclass
class StudyConfig:
    name: str | None = None  # default: the study file's name; the output goes to studies/NAME unless --out
    description: str = ""  # one paragraph for the report
    config: str = "tiny"  # training config of every point: preset name, or a path (relative to the study file)
    overrides: dict[str, Any] = field(default_factory=dict)
    points: list[PointConfig] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)  # key: [values]
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))  # reported final and best
    synthetic_images: int | None = None  # without data.shards: images of the shared synthetic set (None: the
    # training config's train.synth_images), made once at the largest resolution of the study
    launch: SlurmResources = field(default_factory=SlurmResources)  # processes per point, here and on Slurm
    array_parallelism: int = 256  # on Slurm: points of one job array running at once

    def validate(self) -> None:
        self.budget.validate()
        self.launch.validate(LAUNCH_PREFIX)
        if self.array_parallelism < 1:
            raise ConfigError(f"array_parallelism must be at least 1, got {self.array_parallelism}")
        known = (*PER_IMAGE_METRICS, *LPIPS_METRICS, *INCEPTION_METRICS)
        for metric in self.metrics:
            if metric not in known:
                raise ConfigError(f"metrics: {metric!r} is not one of {', '.join(known)}")
        names = [point.name for point in self.points]
        if any(not name for name in names):
            raise ConfigError("points: every point needs a name")
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ConfigError(f"points: names must differ, {', '.join(duplicates)} given twice")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key} must be a list of values, got {values!r}")
        if self.synthetic_images is not None and self.synthetic_images < 2:
            raise ConfigError(f"synthetic_images must be at least 2, got {self.synthetic_images}")


def study_names() -> list[str]:
    return sorted(path.stem for path in (preset_dir() / STUDIES).glob("*.yaml"))


def resolve_study(ref: str | Path) -> Path:
    """A study file from a path, or the name of a shipped one (`smoke` or `smoke.yaml`)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.parent == Path(".") and (shipped := preset_dir() / STUDIES / f"{path.stem}.yaml").is_file():
        return shipped
    raise ConfigError(f"study {ref} is neither a file nor a shipped study; shipped: {', '.join(study_names())}")


def load_study(ref: str | Path, overrides: Sequence[str] = ()) -> tuple[StudyConfig, Path]:
    """The study file (or shipped study) `ref` with command-line overrides, and its path.

    An override whose first word is a field of the study (`budget.steps=100`, `launch.nodes=2`) sets that field;
    any other (`data.shards=/data/ffhq`) is a training override added to every point's.
    """
    path = resolve_study(ref)
    check_time_text(read_yaml(path).get("launch", {}).get("time"), f"study {path}: {TIME_KEY}")
    study_fields = {item.name for item in dataclasses.fields(StudyConfig)}
    dotlist = []
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.shards=/data/ffhq)")
        if key == TIME_KEY and not value.startswith('"'):  # text as given, not YAML's reading of it
            item = f"{key}={json.dumps(value)}"
        dotlist.append(item if key.split(".")[0] in study_fields else f"overrides[{key}]={value}")
    try:
        study = load_config(StudyConfig, path, dotlist)
    except ConfigError as exc:
        if "Missing mandatory value" in str(exc):
            key = str(exc).rsplit(":", 1)[-1].strip()
            raise ConfigError(f"study {path}: {key} must be given, e.g. colorize-dist study run {ref} "
                              f"{key}=...") from None
        raise
    study.name = study.name or path.stem
    return study, path


def check_time_text(value: object, where: str) -> None:
    """A time limit from YAML must be text: YAML reads an unquoted 24:00:00 as 86400 and 30:00 as 1800."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r} is a number: give the time limit as quoted text in one of Slurm's "
                          f"formats ({TIME_FORMATS}), e.g. \"24:00:00\" (YAML reads an unquoted 24:00:00 as 86400)")
