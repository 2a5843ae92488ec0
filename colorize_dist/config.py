"""Typed configuration: dataclasses filled from YAML files and dotted `key=value` overrides.

A config is named by a path or by the name of a preset shipped with the package (`seed000`, `res256`, …:
the YAML files of the repository's configs/, installed as package data). A file may start from another
with `base: NAME_OR_PATH` and give only what differs; bases merge first, deepest first, then the file,
then the overrides. OmegaConf does the merging and type checks; this module turns its exceptions into
one-line errors that name the file or key at fault, so a typo never starts a multi-hour job with a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from colorize_dist.errors import UserError
from colorize_dist.files import atomic_write, first_line

T = TypeVar("T")
BASE_KEY = "base"


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message is meant for the user as is."""


def preset_dir() -> Path:
    """The shipped presets: colorize_dist/configs in an installed wheel, the checkout's configs/ otherwise."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def preset_names() -> list[str]:
    return sorted(path.stem for path in preset_dir().glob("*.yaml"))


def resolve_config(ref: str | Path) -> Path:
    """A config file from a path, or from a preset's name (`seed000` or `seed000.yaml`)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.parent == Path(".") and (preset := preset_dir() / f"{path.stem}.yaml").is_file():
        return preset
    raise ConfigError(f"config {ref} is neither a file nor a preset; presets: {', '.join(preset_names())}")


SEXAGESIMAL = re.compile(r"[-+]?\d[\d_]*(:[0-5]?\d)+")


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                section: str | None = None) -> T:
    """Schema defaults, then the YAML file or preset (or one `section` of it), then `key=value` overrides.

    Unknown keys and values of the wrong type raise ConfigError. The schema's `validate()` method,
    if it has one, runs last.
    """
    merged = OmegaConf.structured(schema)
    data = {} if path is None else read_yaml(resolve_config(path))
    if section is not None:
        data = data.get(section) or {}
    try:
        merged = OmegaConf.merge(merged, data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config error in {path}: {first_line(exc)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=32)")
        key, value = item.split("=", 1)
        if SEXAGESIMAL.fullmatch(value.strip()):  # YAML 1.1 reads 1:30 as 90; on a command line it means the text
            item = f"{key}='{value.strip()}'"
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item}: {first_line(exc)}") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config error: {first_line(exc)}") from None
    check_finite(config)
    if hasattr(config, "validate"):
        config.validate()
    return config


def check_finite(config: Any, prefix: str = "") -> None:
    """NaN and ±inf pass YAML and OmegaConf as floats (`optim.lr=inf`) and would poison a run; refuse them."""
    for item in dataclasses.fields(config):
        value, name = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{name}.")
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{name}={value} must be a finite number")


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in `path`, merged over its `base:` chain (a preset name, or a path relative to `path`)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a preset name or a path, got {base!r}")
    relative = path.parent / base
    base_path = relative if relative.is_file() else resolve_config(base)
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base {base} includes itself")
    merged = OmegaConf.merge(read_yaml(base_path, (*seen, path.resolve())), data)
    return OmegaConf.to_container(merged)


def save_config(config: Any, path: str | Path) -> None:
    """The resolved config as YAML, written atomically (a crash never leaves a truncated config behind)."""
    atomic_write(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
