"""What a point costs: parameters, training FLOPs, the steps a budget buys, and model FLOPs utilisation (MFU).

Model FLOPs per training image (the convention of MFU figures: a backward pass costs twice its forward):
  generator only (no GAN, or a warm-up step):  3·G
  with the discriminator:                       3·G + 8·D
where G and D are one forward pass per image as `colorize-dist model-info` counts them (2 FLOPs per multiply-add
in convolutions, linear layers and attention). D's step scores real and fake pairs (2 forwards + their backwards:
6·D); the generator's adversarial term scores the fake again and back-propagates through D to its input, not its
weights (2·D). The VGG16 perceptual term, normalisation and elementwise ops are not counted, so MFU is a lower
bound of the hardware's work.

MFU = images/s × FLOPs per image / (processes × the GPU's dense peak at the run's precision): bf16/fp16 tensor
cores, or TF32 for fp32 (cuDNN runs fp32 convolutions in TF32 on Ampere and newer by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from colorize_dist.models.info import ModelCost, discriminator_cost, generator_cost
from colorize_dist.training.config import Config

# Dense peak TFLOPS per GPU: (bf16/fp16 tensor cores, fp32 as run by default: TF32 where the GPU has it).
# First match of the device name wins, so the more specific patterns come first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    (r"H100.*PCIe", 756.0, 378.0),
    (r"H100 NVL", 835.0, 417.5),
    (r"GH200|H200|H100|H800", 989.4, 494.7),
    (r"B200", 2250.0, 1100.0),
    (r"A100|A800", 312.0, 156.0),
    (r"L40S", 362.0, 183.0),
    (r"L40\b", 181.0, 90.5),
    (r"\bL4\b", 121.0, 60.0),
    (r"A10G", 70.0, 35.0),
    (r"\bA10\b", 125.0, 62.5),
    (r"V100", 125.0, 15.7),
    (r"\bT4\b", 65.0, 8.1),
]


@dataclass(frozen=True)
class PointCost:
    params_generator: int
    params_discriminator: int  # 0 without a GAN
    flops_generator: int  # one forward pass, per image
    flops_discriminator: int  # one forward pass, per image; 0 without a GAN
    adversarial: bool
    pretrain_steps: int  # generator-only steps before D joins
    batch_size: int  # global, per optimizer step

    @property
    def flops_per_image(self) -> int:
        """Training FLOPs per image once D has joined (see the module docstring)."""
        return 3 * self.flops_generator + 8 * self.flops_discriminator

    def run_flops(self, steps: int) -> float:
        """Training FLOPs of `steps` optimizer steps (the warm-up steps count the generator only)."""
        warmup = min(steps, self.pretrain_steps) if self.adversarial else 0
        return float(self.batch_size) * (warmup * 3 * self.flops_generator + (steps - warmup) * self.flops_per_image)

    def steps_for(self, flops: float) -> int:
        """The fewest optimizer steps whose training FLOPs reach `flops`."""
        warmup_flops = self.run_flops(self.pretrain_steps) if self.adversarial else 0.0
        if flops <= warmup_flops:
            return max(1, math.ceil(flops / (self.batch_size * 3 * self.flops_generator)))
        done = self.pretrain_steps if self.adversarial else 0
        return done + math.ceil((flops - warmup_flops) / (self.batch_size * self.flops_per_image))


_MEASURED: dict[str, ModelCost] = {}  # model costs by (config, resolution): a study asks for each more than once


def _measured(key: str, measure: Callable[[], ModelCost]) -> ModelCost:
    if key not in _MEASURED:
        _MEASURED[key] = measure()
    return _MEASURED[key]


def point_cost(cfg: Config) -> PointCost:
    """Parameters and FLOPs of the training config's networks at its resolution (meta device: no memory, fast)."""
    resolution, generator_cfg, discriminator_cfg = cfg.data.resolution, cfg.model.generator, cfg.model.discriminator
    generator = _measured(f"{generator_cfg!r}@{resolution}", lambda: generator_cost(generator_cfg, resolution))
    discriminator = None
    if cfg.adversarial:
        channels = generator_cfg.out_channels
        discriminator = _measured(f"{discriminator_cfg!r}/{channels}@{resolution}",
                                  lambda: discriminator_cost(discriminator_cfg, channels, resolution))
    return PointCost(
        params_generator=generator.parameters, flops_generator=generator.flops,
        params_discriminator=discriminator.parameters if discriminator else 0,
        flops_discriminator=discriminator.flops if discriminator else 0,
        adversarial=cfg.adversarial, pretrain_steps=cfg.train.pretrain_steps, batch_size=cfg.train.batch_size)


def peak_flops(device: str, mixed_precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU named `device` at Accelerate's `mixed_precision` (no|fp16|bf16); None when
    the device is not a GPU in PEAK_TFLOPS."""
    for pattern, half, single in PEAK_TFLOPS:
        if re.search(pattern, device):
            return (half if mixed_precision in ("fp16", "bf16") else single) * 1e12
    return None


def mfu(images_per_s: float, flops_per_image: float, processes: int, device: str, mixed_precision: str,
        peak_tflops: float | None = None) -> float | None:
    """Model FLOPs utilisation over all processes; None on CPUs and unknown GPUs (unless `peak_tflops` is given)."""
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device, mixed_precision)
    if peak is None or processes < 1:
        return None
    return images_per_s * flops_per_image / (processes * peak)
