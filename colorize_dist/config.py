"""Typed configuration: dataclasses filled from YAML files and dotted `key=value` overrides.

OmegaConf does the merging and type checks; this module turns its exceptions into one-line errors
that name the file or key at fault, so a typo never starts a multi-hour job with a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message is meant for the user as is."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                section: str | None = None) -> T:
    """Schema defaults, then the YAML file (or one `section` of it), then `key=value` overrides.

    Unknown keys and values of the wrong type raise ConfigError. The schema's `validate()` method,
    if it has one, runs last.
    """
    merged = OmegaConf.structured(schema)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, read_yaml(path, section))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=32)")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"config error{where}: {_first_line(exc)}") from None
    if hasattr(config, "validate"):
        config.validate()
    return config


def read_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    if section is not None:
        data = data.get(section) or {}
    return data


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")[0].split())
