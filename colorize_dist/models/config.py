"""Typed configs of the models (YAML section `model:`, with `generator:` and `discriminator:`).

`loss:` is `LossConfig`, defined beside the losses it configures."""

from __future__ import annotations

from dataclasses import dataclass, field

from colorize_dist.config import ConfigError, check_choice
from colorize_dist.models.blocks import ACTIVATIONS, NORMS, UPSAMPLES
from colorize_dist.models.losses import LossConfig
from colorize_dist.models.spaces import CHANNELS


@dataclass
class GeneratorConfig:
    """The attention U-Net. Seeds' baseline: ndims=16, depth=3, num_blocks=1 (variants: depth 4, ndims 32)."""

    ndims: int = 16  # width of the first level; doubles per level
    depth: int = 3  # encoder/decoder levels = number of 2× downsamplings; inputs must divide by 2**depth
    num_blocks: int = 1  # residual blocks per level
    max_width: int = 512  # cap on the doubling, so deep high-resolution models stay affordable
    norm: str = "instance"
    activation: str = "leaky_relu"
    upsample: str = "bilinear"
    attention_gates: bool = True
    transformer_blocks: int = 0  # UVCGAN's pixel-wise ViT at the lowest level; 0 = off
    transformer_dim: int = 256
    transformer_heads: int = 4
    transformer_mlp_ratio: int = 4
    color_space: str = "ab"  # "ab" (2 channels) or "rgb" (3 channels, the seeds' ablation)

    @property
    def out_channels(self) -> int:
        return CHANNELS[self.color_space]

    def validate(self) -> None:
        _check_positive(self, "ndims", "depth", "max_width", "transformer_dim", "transformer_heads",
                        "transformer_mlp_ratio")
        _check_non_negative(self, "num_blocks", "transformer_blocks")
        _check_choice(self, "norm", NORMS)
        _check_choice(self, "activation", ACTIVATIONS)
        _check_choice(self, "upsample", UPSAMPLES)
        _check_choice(self, "color_space", CHANNELS)
        if self.transformer_dim % (4 * self.transformer_heads):
            raise ConfigError(f"generator.transformer_dim={self.transformer_dim} must be divisible by "
                              f"4 × transformer_heads = {4 * self.transformer_heads}")

    def check_resolution(self, resolution: int) -> None:
        """Inputs must halve `depth` times exactly and keep at least 2×2 pixels for the lowest level's norm."""
        multiple = 2**self.depth
        if resolution % multiple or resolution < 2 * multiple:
            raise ConfigError(f"resolution {resolution} does not fit generator.depth={self.depth}: it must be a "
                              f"multiple of 2^depth = {multiple} and at least {2 * multiple}; resize the images or "
                              "lower generator.depth")


@dataclass
class DiscriminatorConfig:
    """pix2pix PatchGAN conditioned on L; n_layers=3 gives 70×70 patches."""

    ndims: int = 64  # width of the first layer; doubles per layer up to 8×
    n_layers: int = 3
    norm: str = "instance"  # "batch" mixes samples, which WGAN-GP's per-sample penalty forbids
    spectral_norm: bool = False
    num_scales: int = 1  # >1: pix2pixHD-style copies on 2×, 4×, … downsampled inputs

    @property
    def receptive_field(self) -> int:
        """Side of the input patch one logit sees (4×4 convs: n_layers with stride 2, then two with stride 1)."""
        field_size = 1
        for stride in [1, 1] + [2] * self.n_layers:  # from the output back to the input
            field_size = (field_size - 1) * stride + 4
        return field_size

    def validate(self) -> None:
        _check_positive(self, "ndims", "n_layers", "num_scales")
        _check_choice(self, "norm", NORMS)

    def check_resolution(self, resolution: int) -> None:
        """The coarsest scale's last normalised layer needs more than one logit per side (else InstanceNorm fails
        deep inside the first step): the input halves n_layers times and must keep at least 3 pixels."""
        if not self._fits(resolution):
            smallest = next(side for side in range(resolution, 2**30) if self._fits(side))
            raise ConfigError(f"resolution {resolution} is too small for discriminator.n_layers={self.n_layers} "
                              f"with num_scales={self.num_scales}: use at least {smallest}, or fewer layers or scales")

    def _fits(self, resolution: int) -> bool:
        side = resolution
        for _ in range(self.num_scales - 1):
            side = (side + 1) // 2  # the 3×3, stride-2 average pool between scales
        return side >> self.n_layers >= 3


@dataclass
class ModelConfig:
    """The YAML `model:` section."""

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self) -> None:
        self.generator.validate()
        self.discriminator.validate()


def check_compatible(discriminator: DiscriminatorConfig, loss: LossConfig) -> None:
    """Refuse batch norm in a WGAN-GP critic: the gradient penalty needs samples scored independently."""
    if loss.adversarial == "wgan-gp" and discriminator.norm == "batch" and loss.theta > 0:
        raise ConfigError("loss.adversarial=wgan-gp needs discriminator.norm other than 'batch' "
                          "(try 'instance' or 'none')")


def _check_choice(config: object, name: str, choices: dict) -> None:
    check_choice(f"{_section(config)}.{name}", getattr(config, name), list(choices))


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_section(config)}.{name} must be positive, got {getattr(config, name)}")


def _check_non_negative(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{_section(config)}.{name} must be ≥ 0, got {getattr(config, name)}")


def _section(config: object) -> str:
    return type(config).__name__.removesuffix("Config").lower()
