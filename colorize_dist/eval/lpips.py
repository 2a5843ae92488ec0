"""LPIPS (Zhang et al. 2018, v0.1, AlexNet) per image: torchmetrics' implementation with weights from a local file.

torchmetrics ships the learned linear layers (its `lpips_models/alex.pth`); the AlexNet backbone is
torchvision's ImageNet weights, `alexnet-owt-7be5be79.pth`, read here from a local path or the torch hub
cache — never downloaded at run time. AlexNet is the variant the LPIPS authors recommend as a forward
metric, and torchmetrics' default. Images are compared as RGB in [0, 1] at their own size (no resize);
AlexNet needs at least 31×31 pixels.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchmetrics.functional.image.lpips import _NoTrainLpips

from colorize_dist.files import first_line

LPIPS_NET = "alex"
LPIPS_WEIGHTS_URL = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
LPIPS_WEIGHTS_FILENAME = LPIPS_WEIGHTS_URL.rsplit("/", 1)[-1]  # alexnet-owt-7be5be79.pth
MIN_SIDE = 31  # smaller images leave AlexNet's third pooling layer nothing to pool


def lpips_weights_path(path: str | Path | None = None) -> Path:
    """`path` if given, else the torch hub cache: $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth."""
    return Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_WEIGHTS_FILENAME


def load_lpips(path: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """torchmetrics' LPIPS network (AlexNet, linear layers v0.1) in eval mode, the backbone from a local file.

    A missing file raises FileNotFoundError naming it and where to put it; cached per (file, device).
    """
    file = lpips_weights_path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"LPIPS AlexNet weights not found at {file}: download {LPIPS_WEIGHTS_URL} to "
                                f"{lpips_weights_path(None)} (the torch hub cache) or pass its path with "
                                "--lpips-weights")
    return _load_lpips(file, str(torch.device(device)))


@functools.cache
def _load_lpips(file: Path, device: str) -> nn.Module:
    net = _NoTrainLpips(net=LPIPS_NET, pnet_rand=True)  # linear layers from torchmetrics; backbone random
    try:
        backbone = torchvision.models.alexnet(weights=None)
        backbone.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"LPIPS AlexNet weights at {file} cannot be loaded ({first_line(exc)}); download "
                         f"{LPIPS_WEIGHTS_URL} again") from None
    # torchmetrics slices AlexNet's `features` into stages whose children keep the features' indices.
    features = dict(backbone.features.named_children())
    for stage in net.net.children():
        for index, layer in stage.named_children():
            layer.load_state_dict(features[index].state_dict())
    return net.to(device).eval()


def lpips_scores(net: nn.Module, pred_rgb: torch.Tensor, true_rgb: torch.Tensor) -> torch.Tensor:
    """(N,) float64 LPIPS of each predicted RGB (N, 3, H, W) in [0, 1] against the ground truth."""
    if min(pred_rgb.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIDE}×{MIN_SIDE} pixels, got "
                         f"{pred_rgb.shape[-2]}×{pred_rgb.shape[-1]}")
    with torch.no_grad():
        return net(pred_rgb.float(), true_rgb.float(), normalize=True).flatten().double()
