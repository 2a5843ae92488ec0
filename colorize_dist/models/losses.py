"""The seeds' loss family: α·reconstruction + β·perceptual (VGG16) + θ·adversarial, plus WGAN-GP's penalty.

Discriminator outputs may be one tensor of patch logits or a list of them (multi-scale); every adversarial
term averages over patches, then over scales, so θ means the same whatever `num_scales` is.

Every term is a mean over the batch's real samples: `mask` (B,) marks them with 1 and the padding copies that fill
an epoch's last global batch with 0, so that every micro-batch keeps its shape (a compiled network sees one shape
on every rank and never recompiles at an epoch's end). None: every sample is real.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from colorize_dist.config import ConfigError, check_choice
from colorize_dist.models.spaces import to_rgb

Logits = torch.Tensor | list[torch.Tensor]

RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {  # per element
    "l1": lambda pred, target: (pred - target).abs(),
    "l2": lambda pred, target: (pred - target).square(),
}

# Index of each ReLU in torchvision's vgg16().features.
VGG16_LAYERS: dict[str, int] = {
    "relu1_1": 1, "relu1_2": 3,
    "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu4_1": 18, "relu4_2": 20, "relu4_3": 22,
    "relu5_1": 25, "relu5_2": 27, "relu5_3": 29,
}
VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's name for the ImageNet weights
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"


def batch_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `values` (B, ...) over each sample, then over the samples that `mask` marks real (on the
    device: no host sync); a batch of padding only gives 0."""
    per_sample = values.float().reshape(len(values), -1).mean(1)
    if mask is None:
        return per_sample.mean()
    return (per_sample * mask).sum() / mask.sum().clamp(min=1)


def vgg16_weights_path(path: str | Path | None = None) -> Path:
    """`path` if given, else the torch hub cache: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth."""
    return Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def load_vgg16_features(path: str | Path | None, num_layers: int) -> nn.Sequential:
    """The first `num_layers` modules of torchvision's VGG16 `features`, frozen, from a local state dict.

    Never downloads: training nodes often have no network, and a silent download per rank is worse.
    """
    file = vgg16_weights_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"VGG16 weights for the perceptual loss not found at {file}: download "
                                f"{VGG16_URL} to that path, set loss.vgg_weights=PATH, or set loss.beta=0")
    state = torch.load(file, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # skip initialising 138 M parameters that the state dict replaces
        features = torchvision.models.vgg16().features[:num_layers]
    prefix = "features."
    features.load_state_dict({key.removeprefix(prefix): value for key, value in state.items()
                              if key.startswith(prefix) and int(key.split(".")[1]) < num_layers}, assign=True)
    return features.requires_grad_(False).eval()


class PerceptualLoss(nn.Module):
    """Mean L1 distance between VGG16 activations of the predicted and the target colour image.

    Both are converted to RGB with the project's differentiable Lab→RGB (or taken as RGB for the "rgb"
    colour space), then ImageNet-normalised as VGG expects. VGG runs in `precision` (the run's fp16 or bf16) under
    its own autocast: on every backend alike, DeepSpeed's included, where Accelerate's autocast does nothing.
    None: whatever autocast is active, if any.
    """

    def __init__(self, layers: list[str], color_space: str = "ab", weights: str | Path | None = None,
                 precision: torch.dtype | None = None):
        super().__init__()
        self.color_space, self.precision = color_space, precision
        self.taps = sorted(VGG16_LAYERS[name] for name in layers)
        self.vgg = load_vgg16_features(weights, self.taps[-1] + 1)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, l: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        with contextlib.nullcontext() if self.precision is None else torch.autocast(l.device.type, self.precision):
            with torch.no_grad():
                target_features = self._features(l, target)
            pred_features = self._features(l, pred)
        pairs = zip(pred_features, target_features, strict=True)
        return torch.stack([batch_mean((p.float() - t.float()).abs(), mask) for p, t in pairs]).mean()

    def _features(self, l: torch.Tensor, color: torch.Tensor) -> list[torch.Tensor]:
        x = (to_rgb(l, color, self.color_space) - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.vgg):
            x = layer(x)
            if index in self.taps:
                taps.append(x)
        return taps


def _scales(logits: Logits) -> list[torch.Tensor]:
    return [x.float() for x in (logits if isinstance(logits, list) else [logits])]


def critic_score(logits: Logits) -> torch.Tensor:
    """One score per sample (B,): the patch logits' mean, averaged over scales."""
    return torch.stack([x.flatten(1).mean(1) for x in _scales(logits)]).mean(0)


class AdversarialLoss(NamedTuple):
    """Per-logit terms; each is averaged over patches and samples, then over scales."""

    real: Callable[[torch.Tensor], torch.Tensor]  # discriminator side, logits of real pairs
    fake: Callable[[torch.Tensor], torch.Tensor]  # discriminator side, logits of generated pairs
    generator: Callable[[torch.Tensor], torch.Tensor]  # generator side, logits of generated pairs


ADVERSARIAL_LOSSES: dict[str, AdversarialLoss] = {
    "vanilla": AdversarialLoss(lambda x: F.softplus(-x), F.softplus, lambda x: F.softplus(-x)),  # BCE, non-saturating
    "lsgan": AdversarialLoss(lambda x: (x - 1).square(), torch.square, lambda x: (x - 1).square()),
    "hinge": AdversarialLoss(lambda x: F.relu(1 - x), lambda x: F.relu(1 + x), torch.neg),
    "wgan-gp": AdversarialLoss(torch.neg, lambda x: x, torch.neg),  # add gradient_penalty on the D side
}


@dataclass
class LossConfig:
    """The YAML `loss:` section: alpha·reconstruction + beta·perceptual + theta·adversarial (seed 000's weights);
    0 skips a term."""

    reconstruction: str = "l1"  # "l1" | "l2"
    alpha: float = 100.0
    beta: float = 10.0
    theta: float = 0.2
    adversarial: str = "vanilla"  # "vanilla" | "lsgan" | "hinge" | "wgan-gp"
    gp_weight: float = 10.0  # WGAN-GP only
    vgg_weights: str | None = None  # torchvision vgg16 state dict; None = $TORCH_HOME/hub/checkpoints
    perceptual_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])

    def validate(self) -> None:
        check_choice("loss.reconstruction", self.reconstruction, list(RECONSTRUCTION_LOSSES))
        check_choice("loss.adversarial", self.adversarial, list(ADVERSARIAL_LOSSES))
        for name in ("alpha", "beta", "theta", "gp_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.perceptual_layers:
            raise ConfigError("loss.perceptual_layers must name at least one VGG16 layer")
        for layer in self.perceptual_layers:
            check_choice("loss.perceptual_layers", layer, list(VGG16_LAYERS))


class GANLoss:
    """Generator- and discriminator-side adversarial terms for one of ADVERSARIAL_LOSSES' modes."""

    def __init__(self, mode: str):
        if mode not in ADVERSARIAL_LOSSES:
            choices = ", ".join(ADVERSARIAL_LOSSES)
            raise ValueError(f"unknown adversarial loss {mode!r}; choose from {choices}")
        self.mode = mode
        self._terms = ADVERSARIAL_LOSSES[mode]

    def discriminator_loss(self, real_logits: Logits, fake_logits: Logits,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
        return _mean(self._terms.real, real_logits, mask) + _mean(self._terms.fake, fake_logits, mask)

    def generator_loss(self, fake_logits: Logits, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _mean(self._terms.generator, fake_logits, mask)


def _mean(term: Callable[[torch.Tensor], torch.Tensor], logits: Logits, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.stack([batch_mean(term(x), mask) for x in _scales(logits)]).mean()


def gradient_penalty(discriminator: Callable[[torch.Tensor, torch.Tensor], Logits], l: torch.Tensor,
                     real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(‖∇ₓ D(l, x)‖₂ − 1)²] at random points between real and fake colour.

    The critic is conditioned on L, so the gradient is taken w.r.t. the colour input only; D's score per
    sample is `critic_score`. Zero exactly when D is 1-Lipschitz with unit gradient along the samples.
    A compiled D runs eagerly here: torch.compile's backward (aot_autograd) has no double backward.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    with torch.compiler.set_stance("force_eager"):
        (grad,) = torch.autograd.grad(critic_score(discriminator(l, mixed)).sum(), mixed, create_graph=True)
    return batch_mean((grad.float().flatten(1).norm(dim=1) - 1).square(), mask)


class GeneratorLoss(nn.Module):
    """α·reconstruction + β·perceptual + θ·adversarial; returns every term and their weighted "total".

    Terms with zero weight are not computed (β = 0 needs no VGG weights, θ = 0 no discriminator). Without
    `fake_logits` the adversarial term is left out: the generator-only warm-up before the GAN phase.
    """

    def __init__(self, cfg: LossConfig, color_space: str = "ab", precision: torch.dtype | None = None):
        super().__init__()
        self.weights = {"reconstruction": cfg.alpha, "perceptual": cfg.beta, "adversarial": cfg.theta}
        self.reconstruction = RECONSTRUCTION_LOSSES[cfg.reconstruction]
        self.perceptual = (PerceptualLoss(cfg.perceptual_layers, color_space, cfg.vgg_weights, precision)
                           if cfg.beta > 0 else None)
        self.gan = GANLoss(cfg.adversarial)

    @property
    def uses_discriminator(self) -> bool:
        return self.weights["adversarial"] > 0

    def forward(self, l: torch.Tensor, fake: torch.Tensor, real: torch.Tensor, fake_logits: Logits | None = None,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if fake_logits is not None and not self.uses_discriminator:
            raise ValueError("discriminator logits given but loss.theta = 0: there is no adversarial term")
        terms = {"reconstruction": batch_mean(self.reconstruction(fake.float(), real.float()), mask)}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(l, fake, real, mask)
        if fake_logits is not None:
            terms["adversarial"] = self.gan.generator_loss(fake_logits, mask)
        terms["total"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms


class DiscriminatorLoss:
    """The adversarial term on real and (detached) fake colour, plus gp_weight × penalty for WGAN-GP.

    The penalty's own backward runs inside the step's forward: it goes through `bare` (D without its DDP or
    DeepSpeed wrapper), as a DeepSpeed engine's backward hooks would reduce ZeRO's gradient buckets inside it. Its
    gradients reach D's weights in the step's backward, with the others, so DDP and ZeRO reduce them as usual.
    """

    def __init__(self, cfg: LossConfig):
        self.gan = GANLoss(cfg.adversarial)
        self.gp_weight = cfg.gp_weight if cfg.adversarial == "wgan-gp" else 0.0

    def __call__(self, discriminator: Callable[[torch.Tensor, torch.Tensor], Logits], l: torch.Tensor,
                 real: torch.Tensor, fake: torch.Tensor, mask: torch.Tensor | None = None,
                 bare: Callable[[torch.Tensor, torch.Tensor], Logits] | None = None) -> dict[str, torch.Tensor]:
        fake = fake.detach()
        terms = {"adversarial": self.gan.discriminator_loss(discriminator(l, real), discriminator(l, fake), mask)}
        if self.gp_weight > 0:
            terms["gradient_penalty"] = gradient_penalty(bare or discriminator, l, real, fake, mask)
        terms["total"] = terms["adversarial"] + self.gp_weight * terms.get("gradient_penalty", 0.0)
        return terms
