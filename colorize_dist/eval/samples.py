"""Sample grids, for training (every `train.sample_every` steps, and TensorBoard) and `colorize-dist eval`:
one row per valid sample, columns gray input | prediction | ground truth, 2-pixel white gaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from colorize_dist.data.loader import Batch
from colorize_dist.eval.metrics import colorize_batch
from colorize_dist.files import atomic_path
from colorize_dist.models.spaces import to_rgb


def sample_grid(generator: nn.Module, batch: Batch, color_space: str | None = None,
                max_images: int | None = None) -> torch.Tensor:
    """(3, H', W') float32 RGB in [0, 1] on the CPU, of the first `max_images` (None: all) valid samples.

    `color_space` ("ab" | "rgb"), if given, is checked against the generator's output (2 or 3 channels).
    The generator runs in eval mode without gradients and is put back as it was.
    """
    keep = batch.valid.to(batch.l.device)
    l, ab = batch.l[keep][:max_images].float(), batch.ab[keep][:max_images].float()
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            predicted = colorize_batch(generator, l.to(next(generator.parameters()).device), color_space)[1]
    finally:
        generator.train(was_training)
    l, ab = l.cpu(), ab.cpu()
    columns = [to_rgb(l, torch.zeros_like(ab), "ab"), predicted.cpu(), to_rgb(l, ab, "ab")]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # gray₀, pred₀, truth₀, gray₁, ...
    return make_grid(rows, nrow=len(columns), padding=2, pad_value=1.0)


def grid_to_uint8(grid: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 of a (3, H, W) grid in [0, 1]."""
    return (grid.clamp(0.0, 1.0) * 255.0).round().byte().permute(1, 2, 0).numpy()


def save_grid(grid: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) grid in [0, 1] as a PNG, atomically."""
    with atomic_path(path) as temporary:
        Image.fromarray(grid_to_uint8(grid)).save(temporary, format="PNG")
