"""Divergence that the NaN guard does not see: losses that explode while staying finite, a model worse than gray.

With a learning rate far too high (optim.lr=1e9 on the tiny preset) the losses need not become NaN/inf: the
generator's tanh output saturates, its loss stays near α (about 95 against 5-40 when it learns), the discriminator's
WGAN terms reach 1e19, and validation ends NaN or under the gray baseline (predicting ab = 0), yet the run would
end "finished" with its exports written. Two checks, on numbers the loop already has, the same on every rank:

- losses, at each logging step: the step's loss magnitude (|loss/g_total| + |loss/d_total|, averaged over ranks)
  against its level, the smallest median of the last WINDOW logged magnitudes seen so far (judged once MIN_HISTORY
  are in, so the first steps only build it). A healthy run's magnitude moves by a few times (pretraining → GAN: the
  discriminator's terms join); JUMP times its level is divergence: the run stops (exit 1) before that step is
  checkpointed or exported. The level restarts with each start of the run (a resume builds it again).
- validation: a NaN psnr_lab stops the run in the same way. After train.pretrain_steps, psnr_lab under the gray
  baseline is said in one line and kept in RUN/summary.json (`worse_than_gray`), not a stop: a GAN can trade PSNR
  for colour, so a healthy run may dip under gray for a while, and its later validations decide the best export.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from colorize_dist.collectives import mean_over_ranks_
from colorize_dist.errors import UserError

JUMP = 1e3  # losses this many times their level: diverged (a healthy run's move by a few times)
WINDOW = 10  # logged magnitudes in the running median
MIN_HISTORY = 3  # logged magnitudes before the first judgement
TOTALS = ("loss/g_total", "loss/d_total")
CAUSE = "the learning rate is the likely cause (optim.lr={lr:g}): lower it, or set optim.grad_clip > 0"


class DivergedError(UserError, RuntimeError):
    """The losses exploded, or validation went NaN; the message names the step and the likely cause."""

    exit_status = 1  # as NonFiniteLossError: the run diverged, its last good checkpoint stays


@dataclass
class DivergenceWatch:
    """The running level of the losses and what validation said about the model; one per start of a run."""

    lr: float
    pretrain_steps: int
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    level: float = math.inf
    worse_than_gray: str | None = None  # the line saying so, for the summary and the final line

    def losses(self, step: int, logs: dict[str, torch.Tensor | None]) -> None:
        """Raise DivergedError when this logging step's losses are JUMP times their level. EVERY RANK (one
        all-reduce), so that every rank decides alike."""
        terms = [logs[name].float().abs() for name in TOTALS if logs.get(name) is not None]
        total = torch.stack(terms).sum().reshape(1)
        mean_over_ranks_([total])
        magnitude = float(total)
        if len(self.recent) >= MIN_HISTORY and magnitude > JUMP * self.level:
            raise DivergedError(f"the losses diverged at step {step}: their magnitude {magnitude:.3g} is "
                                f"{magnitude / self.level:.2g} times their running level {self.level:.3g}; "
                                f"{CAUSE.format(lr=self.lr)}. The step was not checkpointed or exported")
        if math.isfinite(magnitude):
            self.recent.append(magnitude)
            if len(self.recent) >= MIN_HISTORY:
                self.level = min(self.level, statistics.median(self.recent))

    def validation(self, step: int, metrics: dict[str, float]) -> str | None:
        """Raise DivergedError for a NaN psnr_lab; after train.pretrain_steps, return (and keep) the line saying that
        psnr_lab is under the gray baseline, else None. `metrics` are the same on every rank."""
        value, gray = metrics["psnr_lab"], metrics["psnr_lab_gray"]
        if math.isnan(value):
            raise DivergedError(f"validation at step {step} is NaN (psnr_lab; the gray baseline is {gray:.2f} dB): "
                                f"the model diverged; {CAUSE.format(lr=self.lr)}. The step was not checkpointed "
                                "or exported")
        if value < gray and step > self.pretrain_steps:
            self.worse_than_gray = (f"validation at step {step}: psnr_lab {value:.2f} dB is under the gray baseline "
                                    f"{gray:.2f} dB (predicting no colour scores better); if it stays there, "
                                    f"{CAUSE.format(lr=self.lr)}")
            return self.worse_than_gray
        self.worse_than_gray = None
        return None
