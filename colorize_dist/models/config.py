"""Typed configs: the models (YAML section `model:`, with `generator:` and `discriminator:`) and `loss:`."""

from __future__ import annotations

from dataclasses import dataclass, field

from colorize_dist.config import ConfigError
from colorize_dist.models.blocks import ACTIVATIONS, NORMS, UPSAMPLES
from colorize_dist.models.losses import ADVERSARIAL_LOSSES, RECONSTRUCTION_LOSSES, VGG16_LAYERS
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


@dataclass
class ModelConfig:
    """The YAML `model:` section."""

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    def validate(self) -> None:
        self.generator.validate()
        self.discriminator.validate()


@dataclass
class LossConfig:
    """alpha·reconstruction + beta·perceptual + theta·adversarial (seed 000's weights); 0 skips a term."""

    reconstruction: str = "l1"  # "l1" | "l2"
    alpha: float = 100.0
    beta: float = 10.0
    theta: float = 0.2
    adversarial: str = "vanilla"  # "vanilla" | "lsgan" | "hinge" | "wgan-gp"
    gp_weight: float = 10.0  # WGAN-GP only
    vgg_weights: str | None = None  # torchvision vgg16 state dict; None = $TORCH_HOME/hub/checkpoints
    perceptual_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])

    def validate(self) -> None:
        _check_choice(self, "reconstruction", RECONSTRUCTION_LOSSES)
        _check_choice(self, "adversarial", ADVERSARIAL_LOSSES)
        _check_non_negative(self, "alpha", "beta", "theta", "gp_weight")
        if not self.perceptual_layers:
            raise ConfigError("loss.perceptual_layers must name at least one VGG16 layer")
        for layer in self.perceptual_layers:
            if layer not in VGG16_LAYERS:
                raise ConfigError(f"loss.perceptual_layers: unknown layer {layer!r}; "
                                  f"choose from {', '.join(VGG16_LAYERS)}")


def check_compatible(discriminator: DiscriminatorConfig, loss: LossConfig) -> None:
    """Refuse batch norm in a WGAN-GP critic: the gradient penalty needs samples scored independently."""
    if loss.adversarial == "wgan-gp" and discriminator.norm == "batch" and loss.theta > 0:
        raise ConfigError("loss.adversarial=wgan-gp needs discriminator.norm other than 'batch' "
                          "(try 'instance' or 'none')")


def _check_choice(config: object, name: str, choices: dict) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{_section(config)}.{name}={value!r} is not one of {', '.join(choices)}")


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
