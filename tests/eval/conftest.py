"""Fixtures for the eval tests: synthetic shards, a small exported generator, random Inception and AlexNet weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from pytorch_fid import inception as fid_inception
from torch.nn import functional as F

from colorize_dist import cli
from colorize_dist.data import synth_image
from colorize_dist.eval.fid import FID_WEIGHTS_FILENAME
from colorize_dist.eval.lpips import LPIPS_WEIGHTS_FILENAME
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
    no aux head) with pytorch-fid's FID blocks. With default initialisation the features shrink to ~1e-7
    and every image gets the same class, so FID, KID and IS comparisons would pass on noise: the batch-norm
    statistics are set to those of noise and synthetic faces, and the classifier's rows made orthogonal to
    their mean feature and scaled to logits of std 5, so that the logits differ between images.
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
    for module in inception.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the average over the batch below
            module.reset_running_stats()
    faces = torch.from_numpy(np.stack([synth_image(1000 + i, RESOLUTION) for i in range(4)])).permute(0, 3, 1, 2)
    calibration = torch.cat([torch.rand(4, 3, 299, 299),  # noise like the untrained generator's, and faces
                             F.interpolate(faces / 255.0, size=(299, 299), mode="bilinear")]) * 2 - 1
    pooled: list[torch.Tensor] = []
    inception.avgpool.register_forward_hook(lambda module, inputs, output: pooled.append(output.flatten(1)))
    with torch.no_grad():
        inception.train()(calibration)
        inception.eval()(calibration)
        common = pooled[-1].mean(0) / pooled[-1].mean(0).norm()
        inception.fc.weight -= (inception.fc.weight @ common)[:, None] * common[None, :]
        inception.fc.weight *= 5.0 / (pooled[-1] @ inception.fc.weight.T).std()
    path = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(inception.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME-style hub cache holding torchvision's AlexNet weights file, randomly initialised (seeded)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("torch_home_alexnet") / "hub" / "checkpoints" / LPIPS_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


REPO = Path(__file__).resolve().parents[2]


def unwritable_folder_runs(folder: Path, argv: list[str]) -> dict[str, subprocess.CompletedProcess]:
    """`python -m colorize_dist *argv` run twice where `folder` cannot be written: as an unmapped user in a user
    namespace with `folder` read-only by its mode ("permission"), and as root with a read-only tmpfs mounted
    on `folder` ("read-only"). Skips where user and mount namespaces cannot be made."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare with user and mount namespaces (util-linux)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    command = [sys.executable, "-m", "colorize_dist", *argv]
    runs = {"permission": ["unshare", "-U", *command],
            "read-only": ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"', str(folder),
                          *command]}
    return {name: subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=300)
            for name, run in runs.items()}
