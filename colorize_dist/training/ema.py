"""Exponential moving average of the generator's weights, kept in float32.

Not `torch.optim.swa_utils.AveragedModel`: under DeepSpeed bf16 the live weights are bfloat16, and an
average updated by 0.1 % per step in bfloat16 (8 mantissa bits) never moves; this copy stays float32.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from colorize_dist.collectives import mean_over_ranks_


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema ← decay·ema + (1 − decay)·model; buffers are copied, and floating-point ones (BatchNorm statistics,
        which each rank updates from its own micro-batches) averaged over the ranks, so that every rank validates,
        samples and exports the same model. Without such buffers (the default norms) nothing is communicated."""
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach().to(a.device, torch.float32) for a, p in
                                        zip(averaged, model.parameters(), strict=True)], 1.0 - self.decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        mean_over_ranks_([buffer for buffer in self.model.buffers() if buffer.is_floating_point()])

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
