"""Exported generators: exact round trip with config and resolution, run directories, one-line errors, and
starting a run from one (`train.init_generator`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colorize_dist.config import ConfigError
from colorize_dist.models import GeneratorConfig, build_generator
from colorize_dist.models.export import (
    GeneratorFileError,
    init_from_export,
    load_generator,
    resolve_checkpoint,
    save_generator,
)
from tests.training.helpers import tiny_overrides, train_once


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


def test_init_from_export_copies_weights_and_refuses_another_architecture(tmp_path: Path):
    cfg = GeneratorConfig(ndims=4, depth=2)
    torch.manual_seed(1)
    source = build_generator(cfg)
    save_generator(source, cfg, 32, tmp_path / "pretrain" / "export" / "generator_final.safetensors")
    target = build_generator(cfg)
    assert init_from_export(target, cfg, tmp_path / "pretrain") == tmp_path / "pretrain" / "export" / \
        "generator_final.safetensors"
    for expected, actual in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    wider = GeneratorConfig(ndims=8, depth=2)
    with pytest.raises(ConfigError, match=r"is another architecture \(ndims=4\); set model.generator to match"):
        init_from_export(build_generator(wider), wider, tmp_path / "pretrain")
    with pytest.raises(ConfigError, match=f"train.init_generator={tmp_path / 'nothing'}: run directory .* has no "):
        (tmp_path / "nothing").mkdir()
        init_from_export(target, cfg, tmp_path / "nothing")


def test_a_run_starts_from_init_generator_and_its_resume_does_not_need_it(shards: Path, tmp_path: Path):
    """Seed 002's CGAN + pretrained U-Net: G and its EMA start at the export; a resume takes the checkpoint."""
    cfg = GeneratorConfig(ndims=4, depth=2)  # tiny_overrides' generator
    torch.manual_seed(7)
    pretrained = build_generator(cfg)
    init_file = tmp_path / "unet.safetensors"
    save_generator(pretrained, cfg, 16, init_file)
    run_dir = tmp_path / "gan"
    overrides = tiny_overrides(shards, **{"train.max_steps": 1, "train.pretrain_steps": 0, "optim.lr": 1e-12,
                                          "train.init_generator": init_file, "train.validate_every": 100})
    first = train_once(run_dir, overrides)
    assert first.returncode == 0, first.stderr
    assert f"generator initialised from {init_file}" in first.stdout
    ema, _, _ = load_generator(run_dir / "export" / "generator_final.safetensors")  # one step at lr 1e-12
    for expected, actual in zip(pretrained.state_dict().values(), ema.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)

    init_file.unlink()
    resumed = train_once(run_dir, [*overrides, "train.max_steps=2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "initialised" not in resumed.stdout
    fresh = train_once(tmp_path / "fresh", overrides)
    assert fresh.returncode == 2
    assert fresh.stderr.strip() == (f"train: train.init_generator={init_file}: generator file {init_file} does not "
                                    "exist: pass a file written by training (RUN/export/generator_best.safetensors) "
                                    "or the run directory itself")
