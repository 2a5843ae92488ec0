"""Exported generators: one `.safetensors` file holding the weights, the generator config and the resolution.

Everything needed to rebuild the model travels inside the file, in the safetensors header's string metadata
(no sidecar file to lose when copying it):

    "format":           "colorize_dist.generator/1"
    "generator_config": JSON of `dataclasses.asdict(GeneratorConfig)`
    "resolution":       the training resolution (side of the square crops), as a decimal string

A training run writes `RUN/export/generator_final.safetensors` and `RUN/export/generator_best.safetensors`
(EMA weights); `resolve_checkpoint` maps a run directory to the best one (falling back to final), and
`init_from_export` starts another run's generator from it (`train.init_generator`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from colorize_dist.config import ConfigError
from colorize_dist.files import atomic_path, first_line
from colorize_dist.models.config import GeneratorConfig
from colorize_dist.models.generator import build_generator

FORMAT = "colorize_dist.generator/1"
EXPORT_DIR = "export"
EXPORT_NAMES = ("generator_best.safetensors", "generator_final.safetensors")  # preference order in a run dir


class GeneratorFileError(ValueError):
    """A generator file that exists but cannot be used; the message names the file and what to do."""


def save_generator(model: nn.Module, cfg: GeneratorConfig, resolution: int, path: str | Path) -> None:
    """Write `model`'s weights with `cfg` and `resolution` to `path`, atomically (temporary file, then rename).

    Pass the bare module (e.g. `accelerator.unwrap_model(g)` or the EMA copy), not a DDP/compiled wrapper,
    so that the keys match `build_generator(cfg)`. Call it on one rank only: it is a plain file write.
    """
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": FORMAT, "generator_config": json.dumps(dataclasses.asdict(cfg)),
                "resolution": str(int(resolution))}
    with atomic_path(path) as temporary:
        save_file(state, temporary, metadata=metadata)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, GeneratorConfig, int]:
    """(generator in eval mode on `device`, its config, its training resolution) from a `save_generator` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator file {path} does not exist: pass a file written by training "
                                f"(RUN/{EXPORT_DIR}/{EXPORT_NAMES[0]}) or the run directory itself")
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            state = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise GeneratorFileError(f"{path} is not a readable safetensors file ({exc}); re-export it from "
                                 "its training run or copy it again") from None
    if metadata.get("format") != FORMAT:
        raise GeneratorFileError(f"{path} was not written by save_generator (format {metadata.get('format')!r}, "
                                 f"expected {FORMAT!r}); export the generator with colorize_dist.models.export")
    try:
        cfg = GeneratorConfig(**json.loads(metadata["generator_config"]))
        resolution = int(metadata["resolution"])
        model = build_generator(cfg)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, ConfigError, RuntimeError) as exc:
        raise GeneratorFileError(f"{path}: its generator config or weights do not fit this version of "
                                 f"colorize_dist ({first_line(exc)}); re-export it with this version") from None
    return model.to(device).eval(), cfg, resolution


def resolve_checkpoint(run_or_file: str | Path) -> Path:
    """A generator file given itself or its run directory (→ export/generator_best, else generator_final)."""
    path = Path(run_or_file)
    if not path.is_dir():
        return path
    for name in EXPORT_NAMES:
        candidate = path / EXPORT_DIR / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"run directory {path} has no exported generator ({' or '.join(EXPORT_NAMES)} "
                            f"in {path / EXPORT_DIR}); train until the first export, or pass a .safetensors file")


def init_from_export(model: nn.Module, cfg: GeneratorConfig, run_or_file: str | Path) -> Path:
    """Copy an exported generator's weights into `model`, a `build_generator(cfg)`; returns the file used.

    For `train.init_generator`: e.g. a GAN run started from a U-Net trained without the discriminator (seed
    002's best variant). `run_or_file` is a file or a run directory (its best export, else its final one).
    The file's generator config must equal `cfg`; any problem is a ConfigError of one line.
    """
    setting = f"train.init_generator={run_or_file}"
    try:
        path = resolve_checkpoint(run_or_file)
        loaded, loaded_cfg, _ = load_generator(path)
    except (FileNotFoundError, GeneratorFileError) as exc:
        raise ConfigError(f"{setting}: {first_line(exc)}") from None
    if loaded_cfg != cfg:
        differences = ", ".join(f"{field.name}={getattr(loaded_cfg, field.name)!r}"
                                for field in dataclasses.fields(cfg)
                                if getattr(loaded_cfg, field.name) != getattr(cfg, field.name))
        raise ConfigError(f"{setting}: {path} is another architecture ({differences}); set model.generator "
                          "to match it")
    model.load_state_dict(loaded.state_dict())
    return path
