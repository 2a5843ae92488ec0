"""Fixtures for the eval tests: synthetic shards, a small exported generator, random FID Inception weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from pytorch_fid import inception as fid_inception

from colorize_dist import cli
from colorize_dist.eval.fid import FID_WEIGHTS_FILENAME
from colorize_dist.models import GeneratorConfig, build_generator
from colorize_dist.models.export import save_generator

RESOLUTION = 32


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic 32² images; val/ gets 15, which two ranks split 7 + 8 (batches of 4 then need padding)."""
    out = tmp_path_factory.mktemp("eval_shards") / "shards"
    assert cli.main(["shards", "synth", str(out), "--n", "40", "--resolution", str(RESOLUTION), "--format", "png",
                     "--shard-size", "4", "--val-fraction", "0.3", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def generator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained attention U-Net exported as training exports it."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(ndims=4, depth=2)
    path = tmp_path_factory.mktemp("run") / "export" / "generator_best.safetensors"
    save_generator(build_generator(cfg), cfg, RESOLUTION, path)
    return path


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME-style hub cache holding pytorch-fid's weights file, randomly initialised (seeded).

    The file has the layout pytorch-fid's `fid_inception_v3()` loads: torchvision's Inception3 (1008 classes,
    no aux head) with pytorch-fid's FID blocks.
    """
    torch.manual_seed(0)
    inception = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                                   init_weights=False)
    inception.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    inception.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    path = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(inception.state_dict(), path)
    return path
