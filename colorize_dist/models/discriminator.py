"""PatchGAN discriminators conditioned on L: they score (L, colour) pairs per overlapping patch.

pix2pix's N-layer design: 4×4 convolutions, n_layers of them with stride 2 and two with stride 1, so each
logit sees a 70×70 patch for n_layers=3 (`DiscriminatorConfig.receptive_field`). At high resolution a
70×70 patch sees little of a face; the multi-scale option (pix2pixHD) adds copies that look at the pair
downsampled 2×, 4×, …, and returns one logit map per scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from colorize_dist.models.blocks import NORMS
from colorize_dist.models.config import DiscriminatorConfig


class PatchDiscriminator(nn.Module):
    """forward(l, color) → patch logits (B, 1, h, w); widths ndims·2^i, capped at 8·ndims as in pix2pix."""

    def __init__(self, cfg: DiscriminatorConfig, color_channels: int):
        super().__init__()
        widths = [cfg.ndims * min(2**i, 8) for i in range(cfg.n_layers + 1)]

        def conv(cin: int, cout: int, stride: int, bias: bool = True) -> nn.Conv2d:
            layer = nn.Conv2d(cin, cout, 4, stride=stride, padding=1, bias=bias)
            return add_spectral_norm(layer) if cfg.spectral_norm else layer

        layers: list[nn.Module] = [conv(1 + color_channels, widths[0], 2), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.n_layers + 1):
            stride = 2 if i < cfg.n_layers else 1
            layers += [conv(widths[i - 1], widths[i], stride, bias=cfg.norm == "none"),
                       NORMS[cfg.norm](widths[i]), nn.LeakyReLU(0.2)]
        layers.append(conv(widths[-1], 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, l: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([l, color], dim=1))


class MultiScaleDiscriminator(nn.Module):
    """num_scales PatchDiscriminators, the k-th on the pair average-pooled k times; forward returns a list."""

    def __init__(self, cfg: DiscriminatorConfig, color_channels: int):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(cfg, color_channels) for _ in range(cfg.num_scales))

    def forward(self, l: torch.Tensor, color: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for index, discriminator in enumerate(self.scales):
            if index > 0:
                l, color = (F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False) for x in (l, color))
            logits.append(discriminator(l, color))
        return logits


def build_discriminator(cfg: DiscriminatorConfig, color_channels: int) -> nn.Module:
    """One PatchGAN returning a logit map, or, for num_scales > 1, several returning a list of maps."""
    cfg.validate()
    if cfg.num_scales == 1:
        return PatchDiscriminator(cfg, color_channels)
    return MultiScaleDiscriminator(cfg, color_channels)
