"""One network's parameter update under Accelerate: backward, and at the accumulation boundary clipping,
the optimizer and LR steps, zeroing — with DDP (or one process) or with a DeepSpeed engine.

`accelerator.backward` drives only the first DeepSpeed engine an Accelerator prepared, and a GAN has two
(generator and discriminator), so under DeepSpeed each Update drives its own engine the way Accelerate
drives its one: boundary flag, `engine.backward`, then `engine.step()` (which clips, steps and zeroes).
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


class Update:
    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.grad_clip = grad_clip
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(is_boundary=self.accelerator.sync_gradients)
            self.model.backward(loss)  # scales by 1/accumulation steps itself
        else:
            self.accelerator.backward(loss)

    def step(self) -> torch.Tensor | float | None:
        """At an accumulation boundary: clip, step, zero; returns the gradient norm before clipping (or None),
        left on the device so that steps which do not log never wait for it."""
        if not self.accelerator.sync_gradients:
            return None
        if self.deepspeed:
            self.model.step()
            grad_norm = self.model.get_global_grad_norm()
        else:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def discard(self) -> None:
        """Drop the gradients accumulated so far in this step (after a NaN/inf loss on some rank)."""
        if self.deepspeed:
            self.model.zero_grad()
        else:
            self.accelerator.unwrap_model(self.model).zero_grad(set_to_none=True)
