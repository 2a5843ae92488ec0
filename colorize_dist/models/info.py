"""Parameters, FLOPs and activation memory of G and D, counted on the meta device so that even 1024² costs nothing.

FLOPs are torch.utils.flop_counter's (2 per multiply-add, the MFU convention); activation memory counts attention as
PyTorch's math backend stores it, an upper bound for flash kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from colorize_dist.models.config import DiscriminatorConfig, GeneratorConfig, ModelConfig
from colorize_dist.models.discriminator import build_discriminator
from colorize_dist.models.generator import build_generator


def forward_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of `model` on `inputs` (whole batch), as torch's FlopCounterMode counts them.

    Attention runs as the math kernel, the one the meta device has, so its two matmuls count like any other.
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def activation_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (whole batch).

    Each storage counts once however many ops save it or views of it; parameters and buffers don't count.
    """
    state = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in state:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(*inputs)  # kept alive until summed, so no storage is freed and its address reused
    total = sum(saved.values())
    del output
    return total


DEFAULT_RESOLUTIONS = [64, 128, 256]


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    flops: int  # forward, per sample
    activation_bytes: int  # float32, per sample


def measure(build: Callable[[], nn.Module], *input_shapes: tuple[int, ...], batch: int = 2) -> ModelCost:
    """Cost per sample of the model `build()` returns, on inputs of the given per-sample shapes (meta device).

    A batch of 2 keeps batch norm valid in training mode; results are divided by it.
    """
    with torch.device("meta"):
        model = build().train()
        inputs = [torch.empty(batch, *shape) for shape in input_shapes]
    return ModelCost(
        parameters=sum(p.numel() for p in model.parameters()),
        flops=forward_flops(model, *inputs) // batch,
        activation_bytes=activation_bytes(model, *inputs) // batch,
    )


def generator_cost(cfg: GeneratorConfig, resolution: int) -> ModelCost:
    return measure(lambda: build_generator(cfg), (1, resolution, resolution))


def discriminator_cost(cfg: DiscriminatorConfig, color_channels: int, resolution: int) -> ModelCost:
    return measure(lambda: build_discriminator(cfg, color_channels),
                   (1, resolution, resolution), (color_channels, resolution, resolution))


def cost_table(cfg: ModelConfig, resolutions: list[int]) -> str:
    costs = {
        "generator": lambda r: generator_cost(cfg.generator, r),
        "discriminator": lambda r: discriminator_cost(cfg.discriminator, cfg.generator.out_channels, r),
    }
    rows = [(name, f"{resolution}²", c.parameters, c.flops / 1e9, c.activation_bytes / 2**20)
            for name, cost in costs.items() for resolution in resolutions for c in [cost(resolution)]]
    return tabulate(rows, ["model", "resolution", "params", "GFLOP/sample", "act MiB/sample"], tablefmt="plain",
                    intfmt=",", floatfmt=("", "", "", ".3f", ".1f"), colalign=("left", "right", "right", "right",
                                                                               "right"))
