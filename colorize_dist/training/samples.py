"""Sample grids: one row per fixed validation image, columns gray input | prediction | ground truth."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from colorize_dist.data.loader import Batch
from colorize_dist.models.spaces import to_rgb


@torch.no_grad()
def sample_grid(generator: nn.Module, batch: Batch, color_space: str) -> torch.Tensor:
    """(3, H', W') float RGB in [0, 1]."""
    l, ab = batch.l.float(), batch.ab.float()
    prediction = generator(l)
    columns = [to_rgb(l, torch.zeros_like(ab), "ab"), to_rgb(l, prediction, color_space), to_rgb(l, ab, "ab")]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # gray₀, pred₀, truth₀, gray₁, ...
    return torchvision.utils.make_grid(rows.cpu(), nrow=len(columns), padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)
