"""Generator, discriminator and losses for L → colour; configs in `colorize_dist.models.config`."""

from colorize_dist.models.config import (
    DiscriminatorConfig,
    GeneratorConfig,
    LossConfig,
    ModelConfig,
    check_compatible,
)
from colorize_dist.models.discriminator import MultiScaleDiscriminator, PatchDiscriminator, build_discriminator
from colorize_dist.models.generator import AttentionUNet, build_generator
from colorize_dist.models.losses import (
    DiscriminatorLoss,
    GANLoss,
    GeneratorLoss,
    PerceptualLoss,
    critic_score,
    gradient_penalty,
)
from colorize_dist.models.spaces import to_rgb

__all__ = [
    "AttentionUNet",
    "DiscriminatorConfig",
    "DiscriminatorLoss",
    "GANLoss",
    "GeneratorConfig",
    "GeneratorLoss",
    "LossConfig",
    "ModelConfig",
    "MultiScaleDiscriminator",
    "PatchDiscriminator",
    "PerceptualLoss",
    "build_discriminator",
    "build_generator",
    "check_compatible",
    "critic_score",
    "gradient_penalty",
    "to_rgb",
]
