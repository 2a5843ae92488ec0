"""Exported generators: exact round trip with config and resolution, run directories, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colorize_dist.models import GeneratorConfig, build_generator
from colorize_dist.models.export import GeneratorFileError, load_generator, resolve_checkpoint, save_generator


def test_round_trip_keeps_weights_config_and_resolution(tmp_path: Path):
    cfg = GeneratorConfig(ndims=4, depth=2, color_space="rgb", attention_gates=False)
    model = build_generator(cfg)
    path = tmp_path / "export" / "generator_final.safetensors"
    save_generator(model, cfg, 48, path)
    loaded, loaded_cfg, resolution = load_generator(path)
    assert (loaded_cfg, resolution, loaded.training) == (cfg, 48, False)
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert resolve_checkpoint(tmp_path) == path  # falls back to final when there is no best


def test_bad_files_give_one_line_naming_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"generator file {tmp_path / 'missing.safetensors'} does not exist"):
        load_generator(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GeneratorFileError, match=f"{corrupt} is not a readable safetensors file"):
        load_generator(corrupt)
    with pytest.raises(FileNotFoundError, match=f"run directory {tmp_path} has no exported generator"):
        resolve_checkpoint(tmp_path)
