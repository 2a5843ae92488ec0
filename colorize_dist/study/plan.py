"""A study's points: each named point crossed with every grid combination, resolved to a checked training config,
its processes and its run dir (OUT/points/<name>). Planning writes nothing; every error names the point."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from colorize_dist.config import ConfigError, resolve_config
from colorize_dist.files import first_line
from colorize_dist.launch.resources import SlurmResources
from colorize_dist.study.config import LAUNCH_PREFIX, TIME_KEY, PointConfig, StudyConfig, check_time_text
from colorize_dist.training.config import Config, check_launch, load_training_config
from colorize_dist.training.costs import point_cost

POINTS = "points"  # OUT/points/<point>: each point's run dir
DATA = "data"  # OUT/data/synthetic-…: the shared synthetic shards, when the config names none


@dataclass
class Point:
    name: str  # label in the report
    slug: str  # its run dir's name
    settings: dict[str, Any]  # what this point sets (named point + grid), by dotted key
    cfg: Config  # resolved: the study's and the point's overrides, the budget, the shards
    launch: SlurmResources
    run_dir: Path

    @property
    def num_processes(self) -> int:
        return self.launch.num_processes

    def value(self, key: str) -> Any:
        """The point's value of a dotted training key or `launch.*` key, as resolved."""
        target: Any = self.launch if key.startswith(LAUNCH_PREFIX) else self.cfg
        for part in key.removeprefix(LAUNCH_PREFIX).split("."):
            target = getattr(target, part)
        return target


@dataclass
class Plan:
    study: StudyConfig
    path: Path  # the study file
    out: Path
    points: list[Point]
    synthetic: Path | None  # shared synthetic shards to make before the runs (None: the config names shards)
    synthetic_images: int
    synthetic_resolution: int

    @property
    def axes(self) -> list[str]:
        """The keys the points set whose resolved values differ between points, in the study's order."""
        keys = dict.fromkeys(key for point in self.points for key in point.settings)
        return [key for key in keys if len({repr(point.value(key)) for point in self.points}) > 1]


def default_out(study: StudyConfig) -> Path:
    return Path("studies") / str(study.name)


def make_plan(study: StudyConfig, path: Path, out: Path | None = None) -> Plan:
    out = Path(out) if out is not None else default_out(study)
    config = _training_config(study.config, path)
    crossed = [point for point in study.points if point.cross]
    if not crossed and (study.grid or not study.points):
        crossed = [PointConfig(name="")]  # the grid alone (or, with neither, the config itself)
    short = short_names(list(study.grid))
    combos = [dict(zip(study.grid, values, strict=True)) for values in itertools.product(*study.grid.values())]
    alone = [(point, {}) for point in study.points if not point.cross]
    points = []
    for base, combo in [*itertools.product(crossed, combos), *alone]:
        label = ", ".join(f"{short[key]}={format_value(value)}" for key, value in combo.items())
        name = ", ".join(part for part in (base.name, label) if part) or str(study.name)
        settings = {**base.overrides, **combo}
        try:
            points.append(_point(study, config, name, settings, out))
        except ConfigError as exc:
            raise ConfigError(f"study {path}, point {name!r}: {exc}") from None
    slugs = [point.slug for point in points]
    if duplicates := sorted({slug for slug in slugs if slugs.count(slug) > 1}):
        raise ConfigError(f"study {path}: points share the run dir name {', '.join(duplicates)}; rename them")
    synthetic_points = [point for point in points if point.cfg.data.shards is None]
    images = study.synthetic_images or (synthetic_points[0].cfg.train.synth_images if synthetic_points else 0)
    resolution = max((point.cfg.data.resolution for point in synthetic_points), default=0)
    synthetic = out / DATA / f"synthetic-{images}x{resolution}" if synthetic_points else None
    for point in synthetic_points:
        point.cfg.data.shards = str(synthetic.absolute())
    return Plan(study, path, out, points, synthetic, images, resolution)


def _training_config(ref: str, study_path: Path) -> Path:
    """The training config named by the study: a path relative to the study file, or as config.py resolves it."""
    relative = study_path.parent / ref
    return relative if relative.is_file() else resolve_config(ref)


def _point(study: StudyConfig, config: Path, name: str, settings: dict[str, Any], out: Path) -> Point:
    overrides = {**study.overrides, **settings}
    launch_items = {key.removeprefix(LAUNCH_PREFIX): value for key, value in overrides.items()
                    if key.startswith(LAUNCH_PREFIX)}
    check_time_text(overrides.get(TIME_KEY), TIME_KEY)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(study.launch), launch_items)
        launch = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"launch: {first_line(exc)}") from None
    launch.validate(LAUNCH_PREFIX)
    launch.tasks_per_node = launch.processes_per_node  # resolved, so that the report shows what ran
    dotlist = [f"{key}={json.dumps(value)}" for key, value in overrides.items() if not key.startswith(LAUNCH_PREFIX)]
    cfg = load_training_config(config, dotlist)
    apply_budget(study, cfg)
    if "tensorboard" not in cfg.train.trackers:  # the report reads throughput and learning curves from its logs
        cfg.train.trackers.append("tensorboard")
    cfg.validate()
    check_launch(cfg.train, launch.num_processes)
    slug = slugify(name)
    return Point(name=name, slug=slug, settings=settings, cfg=cfg, launch=launch, run_dir=out / POINTS / slug)


def apply_budget(study: StudyConfig, cfg: Config) -> None:
    """Set the point's train.max_steps (or train.epochs) from the study's budget."""
    given = study.budget.given()
    if given is None:
        return
    kind, amount = given
    if kind == "epochs":
        cfg.train.epochs, cfg.train.max_steps = int(amount), 0
    elif kind == "steps":
        cfg.train.max_steps = int(amount)
    elif kind == "images":
        cfg.train.max_steps = math.ceil(amount / cfg.train.batch_size)
    else:
        cfg.train.max_steps = point_cost(cfg).steps_for(float(amount))


def short_names(keys: list[str]) -> dict[str, str]:
    """`data.resolution` → `resolution`, unless two keys end alike (then the whole key)."""
    tails = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(keys, tails, strict=True)}


def format_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def slugify(name: str) -> str:
    """A file-safe run dir name: `U-Net(depth=3) + GAN` → `U-Net-depth=3-GAN`."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", name).strip("-.") or "point"
