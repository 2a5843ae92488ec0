"""The colour spaces the generator can predict, and how each becomes RGB.

"ab": 2 channels, CIELAB a/b divided by 110 (colorize_dist.color's normalisation), so tanh's (−1, 1) covers the
Lab gamut; the L input supplies lightness. "rgb" (the seeds' colour-space ablation): 3 channels, RGB in [0, 1]
mapped to (−1, 1) as 2·rgb − 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from colorize_dist.color import l_ab_to_lab, lab_to_rgb

CHANNELS: dict[str, int] = {"ab": 2, "rgb": 3}

_TO_RGB: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ab": lambda l, ab: lab_to_rgb(l_ab_to_lab(l, ab), impl="ref"),
    "rgb": lambda l, rgb: (rgb.float() + 1) / 2,
}


def to_rgb(l: torch.Tensor, color: torch.Tensor, space: str) -> torch.Tensor:
    """Differentiable RGB in [0, 1], (N, 3, H, W) float32, from normalised L and the generator's output."""
    return _TO_RGB[space](l, color)
