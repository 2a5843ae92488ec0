"""One network's update, owned here for DDP (or one process) and DeepSpeed engines alike.

An optimizer step of one network is `train.grad_accum` micro-batches, then one step:

    for index, micro_batch in enumerate(micro_batches):
        with update.micro_batch(index):            # around the micro-batch's forward and backward
            update.backward(loss_of(micro_batch))
    outcome = update.step()                          # applied (or skipped on every rank), gradient norm

- DDP (or one process): all micro-batches but the last run under `no_sync()`, so the gradients are all-reduced
  once per step, in the last backward. `step()` then unscales this network's gradients only (fp16: each network
  has its own GradScaler, updated once per step), takes their norm, clips at optim.grad_clip, steps the optimizer
  and the LR schedule and zeroes the gradients.
- DeepSpeed: each micro-batch sets the engine's accumulation boundary (False, ..., True), `engine.backward` divides
  by grad_accum, and `engine.step()` does the rest inside the engine (ZeRO keeps gradients partitioned); the
  clipping threshold is ours (see build.py). The engine's `no_sync()` is never needed: with the boundary flag,
  stages 0 and 1 reduce only at the boundary, stage 2 on every micro-batch by design.
- NaN/inf: `backward` multiplies a non-finite loss by NaN, so every gradient of that rank becomes NaN and the
  gradient reduction carries it to every rank. All ranks then see the same non-finite gradient norm and skip the
  whole update of that network (all micro-batches) without any extra collective: one host sync per network and
  step. DeepSpeed's ZeRO and bf16/fp16 optimizers run that check themselves and clear their own (partitioned)
  gradients, which is what `was_step_applied()` reports; fp16 loss-scale overflows are skips as well. A skipped
  update steps neither the optimizer nor the LR schedule.

Accelerate keeps what it is good at (devices, process group, wrapping, autocast, checkpoints); it never drives
these updates: `accelerator.accumulate/backward/clip_grad_norm_` act on the first engine or on every optimizer,
and a GAN has two networks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Outcome:
    applied: bool  # False: NaN/inf gradients (or an fp16 overflow) on some rank; every rank skipped the update
    grad_norm: torch.Tensor | None  # before clipping, left on the device; None where an engine does not report it


class Update:
    """The update of one network: `model` as prepared by Accelerate (DDP module, plain module or DeepSpeed engine)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, grad_clip: float, accumulation: int,
                 deepspeed: bool = False, scaler: torch.amp.GradScaler | None = None):
        self.model, self.scheduler, self.scaler = model, scheduler, scaler
        self.grad_clip, self.accumulation, self.deepspeed = grad_clip, accumulation, deepspeed
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under Accelerate's wrapper
        # DeepSpeed's plain fp32 path (ZeRO stage 0) steps the torch optimizer as it is, with no non-finite check.
        self.engine_checks = deepspeed and (model.zero_optimization() or model.fp16_enabled()
                                            or model.bfloat16_enabled())

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        """Around micro-batch `index` (0 .. grad_accum - 1) of a step: its forward and its backward."""
        last = index == self.accumulation - 1
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
            yield
        elif not last and isinstance(self.model, DistributedDataParallel):
            with self.model.no_sync():  # DDP decides in the forward whether the backward all-reduces
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradients of `loss` (the micro-batch's mean, as with the whole batch)."""
        loss = loss * torch.where(loss.detach().isfinite(), 1.0, float("nan"))  # non-finite: all gradients NaN
        if self.deepspeed:
            self.model.backward(loss)  # divides by grad_accum (and scales for fp16) itself
        elif self.scaler is not None:
            self.scaler.scale(loss / self.accumulation).backward()
        else:
            (loss / self.accumulation).backward()

    def step(self) -> Outcome:
        """After the last micro-batch's backward: clip, step and zero this network, or skip it on every rank."""
        if self.engine_checks:  # DeepSpeed ZeRO, bf16 or fp16: the engine checks, clips, steps and zeroes
            self.model.step()
            norm = self.model.get_global_grad_norm()
            outcome = Outcome(self.model.was_step_applied(), None if norm is None else torch.as_tensor(norm))
        else:
            outcome = self._step_whole_gradients()
        if outcome.applied:
            self.scheduler.step()
        return outcome

    def _step_whole_gradients(self) -> Outcome:
        """Every rank holds the whole reduced gradients: DDP, one process, or DeepSpeed's plain fp32 stage 0."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # this network's optimizer only, once per step
        parameters = [param for param in self.model.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm([param.grad for param in parameters])
        applied = bool(norm.isfinite())  # the step's one host sync; the same on every rank (reduced gradients)
        if applied and self.deepspeed:
            self.model.step()  # clips at the engine's gradient_clipping, steps, zeroes
        elif applied:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.grad_clip, norm)
            self.optimizer.step()
        if self.deepspeed:
            self.model.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after enough good steps
        return Outcome(applied, norm)
