"""Attention U-Net generator: normalised L (B, 1, H, W) → colour (B, 2 or 3, H, W) in (−1, 1).

UVCGAN's U-Net (residual stages, learned 2× downsampling, optional pixel-wise transformer at the lowest
level) with Attention U-Net gates on the skip connections. Level i works at H/2^i with
min(ndims·2^i, max_width) channels; there are `depth` downsamplings, so H and W must divide by 2^depth.
"""

from __future__ import annotations

import torch
from torch import nn

from colorize_dist.models.blocks import UPSAMPLES, AttentionGate, PixelTransformer, conv_stage
from colorize_dist.models.config import GeneratorConfig


class EncoderLevel(nn.Module):
    """A stage at this level's resolution; returns its features (the skip) and their 2× downsampling."""

    def __init__(self, in_channels: int, out_channels: int, cfg: GeneratorConfig):
        super().__init__()
        self.stage = conv_stage(in_channels, out_channels, cfg.num_blocks, cfg.norm, cfg.activation)
        self.down = nn.Conv2d(out_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.stage(x)
        return skip, self.down(skip)


class DecoderLevel(nn.Module):
    """Upsample from the level below, gate the skip with the upsampled features, concatenate, run a stage."""

    def __init__(self, in_channels: int, out_channels: int, cfg: GeneratorConfig):
        super().__init__()
        self.up = UPSAMPLES[cfg.upsample](in_channels, out_channels)
        self.gate = AttentionGate(out_channels, out_channels) if cfg.attention_gates else None
        self.stage = conv_stage(2 * out_channels, out_channels, cfg.num_blocks, cfg.norm, cfg.activation)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.gate is not None:
            skip = self.gate(skip, x)
        return self.stage(torch.cat([x, skip], dim=1))


class AttentionUNet(nn.Module):
    """forward(l) → tanh colour; encoder[i] and decoder[i] work at level i, the bottleneck at level depth."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.depth = cfg.depth
        widths = [min(cfg.ndims * 2**level, cfg.max_width) for level in range(cfg.depth + 1)]
        in_widths = [1, *widths[:-2]]
        self.encoder = nn.ModuleList(EncoderLevel(in_widths[level], widths[level], cfg) for level in range(cfg.depth))
        self.bottleneck = conv_stage(widths[-2], widths[-1], cfg.num_blocks, cfg.norm, cfg.activation)
        self.transformer = (
            PixelTransformer(widths[-1], cfg.transformer_dim, cfg.transformer_heads, cfg.transformer_blocks,
                             cfg.transformer_mlp_ratio)
            if cfg.transformer_blocks > 0 else None
        )
        # decoder[i] rises from level i + 1 to level i; run in reverse.
        self.decoder = nn.ModuleList(
            DecoderLevel(widths[level + 1], widths[level], cfg) for level in range(cfg.depth)
        )
        self.head = nn.Conv2d(widths[0], cfg.out_channels, 1)

    def forward(self, l: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if l.shape[-2] % multiple or l.shape[-1] % multiple:
            raise ValueError(f"input size {l.shape[-2]}×{l.shape[-1]} is not divisible by 2^depth = "
                             f"{multiple}; crop or pad the images, or lower generator.depth")
        skips = []
        x = l
        for level in self.encoder:
            skip, x = level(x)
            skips.append(skip)
        x = self.bottleneck(x)
        if self.transformer is not None:
            x = self.transformer(x)
        for level, skip in zip(reversed(self.decoder), reversed(skips), strict=True):
            x = level(x, skip)
        return torch.tanh(self.head(x))


def build_generator(cfg: GeneratorConfig) -> AttentionUNet:
    cfg.validate()
    return AttentionUNet(cfg)
