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
  whole update of that network (all micro-batches) without any extra collective. The decision stays on the
  device, as GradScaler's does: the fused Adam takes the norm's non-finite flag as `found_inf` and leaves weights,
  moments and its step count as they were, so the host never waits for the device within a step and can queue
  the next one; the loop reads the flags on logging steps. A skipped update still counts as a step (the LR
  schedule moves on, as with GradScaler). DeepSpeed's ZeRO and bf16/fp16 optimizers run that check themselves
  (on the host, inside the engine) and clear their own (partitioned) gradients, which is what
  `was_step_applied()` reports; fp16 loss-scale overflows are skips as well.

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
    applied: torch.Tensor  # 0-dim bool on the device; False: NaN/inf gradients (or an fp16 overflow) on some rank,
    # every rank skipped the update. Reading it waits for the device: the loop does so on logging steps only.
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
            outcome = Outcome(torch.tensor(self.model.was_step_applied()),
                              None if norm is None else torch.as_tensor(norm))
        else:
            outcome = self._step_whole_gradients()
        self.scheduler.step()
        return outcome

    def _step_whole_gradients(self) -> Outcome:
        """Every rank holds the whole reduced gradients: DDP, one process, or DeepSpeed's plain fp32 stage 0."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # this network's optimizer only, once per step
        parameters = [param for param in self.model.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm([param.grad for param in parameters])
        applied = norm.isfinite()  # the same on every rank (reduced gradients)
        if self.deepspeed:  # the plain fp32 engine has no skip of its own: decided on the host
            if applied:
                self.model.step()  # clips at the engine's gradient_clipping, steps, zeroes
            self.model.zero_grad()
        else:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.grad_clip, norm)
            self.optimizer.found_inf = (~applied).float()  # fused Adam: skips the whole update on the device
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after enough good steps
        return Outcome(applied, norm)


class SkippedSteps:
    """Steps in which an update was skipped, tallied on the device; `read` waits for it (logging steps only)."""

    def __init__(self, device: torch.device, in_a_row: int = 0):
        self.device = device
        self.since_read = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.tensor(in_a_row, dtype=torch.long, device=device)
        self.longest = self.in_a_row.clone()  # the longest run in a row since the last read

    def add(self, *outcomes: Outcome | None) -> None:
        """One step's outcomes (None: no update of that network in the step)."""
        applied = torch.stack([outcome.applied.to(self.device, non_blocking=True) for outcome in outcomes
                               if outcome is not None])
        skipped = (~applied).any().long()
        self.since_read += skipped
        self.in_a_row.add_(1).mul_(skipped)
        torch.maximum(self.longest, self.in_a_row, out=self.longest)

    def read(self) -> tuple[int, int, int]:
        """(steps skipped since the last read, in a row now, the longest run in a row since the last read)."""
        since_read, in_a_row, longest = torch.stack([self.since_read, self.in_a_row, self.longest]).tolist()
        self.since_read.zero_()
        self.longest.copy_(self.in_a_row)
        return since_read, in_a_row, longest
