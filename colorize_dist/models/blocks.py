"""Building blocks shared by the generator and the discriminator.

Normalisations, activations and upsampling modes are dict registries keyed by the names the config uses,
so a typo fails in `validate()` with the list of valid names instead of silently picking a default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    # Per-sample statistics: independent of the per-GPU batch size and valid under WGAN-GP.
    "instance": lambda channels: nn.InstanceNorm2d(channels, affine=True),
    "group": lambda channels: nn.GroupNorm(math.gcd(32, channels), channels),
    "none": lambda channels: nn.Identity(),
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

UPSAMPLES: dict[str, Callable[[int, int], nn.Module]] = {
    "bilinear": lambda cin, cout: nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cout, 3, padding=1)
    ),
    "nearest": lambda cin, cout: nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)
    ),
    "transpose": lambda cin, cout: nn.ConvTranspose2d(cin, cout, 2, stride=2),
}


class ConvBlock(nn.Sequential):
    """3×3 convolution, normalisation, activation; the conv has no bias when a norm would cancel it."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, activation: str):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
            NORMS[norm](out_channels),
            ACTIVATIONS[activation](),
        )


class ResBlock(nn.Module):
    """Two 3×3 convolutions with an identity shortcut (UVCGAN's basic block)."""

    def __init__(self, channels: int, norm: str, activation: str):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, norm, activation),
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"),
            NORMS[norm](channels),
        )
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.body(x))


def conv_stage(in_channels: int, out_channels: int, num_blocks: int, norm: str,
               activation: str) -> nn.Sequential:
    """The work done at one U-Net level: change width once, then `num_blocks` residual blocks."""
    return nn.Sequential(
        ConvBlock(in_channels, out_channels, norm, activation),
        *(ResBlock(out_channels, norm, activation) for _ in range(num_blocks)),
    )


class AttentionGate(nn.Module):
    """Attention U-Net's additive gate: the decoder's features decide which skip pixels pass through.

    Both inputs have the same spatial size (the gate is applied after upsampling); the output is the skip
    tensor scaled per pixel by a sigmoid score in (0, 1).
    """

    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        inner = max(skip_channels // 2, 1)
        self.skip_proj = nn.Conv2d(skip_channels, inner, 1, bias=False)  # gate_proj's bias covers both
        self.gate_proj = nn.Conv2d(gate_channels, inner, 1)
        self.score = nn.Conv2d(inner, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * torch.sigmoid(self.score(F.relu(self.skip_proj(skip) + self.gate_proj(gate))))


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D) through `scaled_dot_product_attention`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention then a GELU MLP, each on a residual branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PixelTransformer(nn.Module):
    """UVCGAN's bottleneck: every pixel of the lowest U-Net level is a token.

    Positions are fixed 2-D sine features computed for the actual grid, so one model runs at any input
    size; the transformer sits on a residual branch, leaving the convolutional path intact.
    """

    def __init__(self, channels: int, dim: int, heads: int, num_blocks: int, mlp_ratio: int):
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x.flatten(2).transpose(1, 2))
        tokens = tokens + sine_positions(h, w, tokens.shape[-1], tokens.device, tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return x + self.proj_out(self.norm(tokens)).transpose(1, 2).reshape(b, c, h, w)


def sine_positions(height: int, width: int, dim: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(H·W, dim) sine/cosine features of the row (first half) and column (second half) of each pixel."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    rows = torch.arange(height, device=device)[:, None] * freqs
    cols = torch.arange(width, device=device)[:, None] * freqs
    row_feats = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None].expand(height, width, 2 * quarter)
    col_feats = torch.cat([cols.sin(), cols.cos()], dim=1)[None].expand(height, width, 2 * quarter)
    return torch.cat([row_feats, col_feats], dim=2).reshape(height * width, 4 * quarter).to(dtype)
