"""The divergence watch on loss and validation sequences: what it stops, what it flags, what it lets through."""

from __future__ import annotations

import math

import pytest
import torch

from colorize_dist.training.divergence import DivergedError, DivergenceWatch


def logs(g_total: float, d_total: float | None = None) -> dict[str, torch.Tensor | None]:
    return {"loss/g_total": torch.tensor(g_total), "loss/d_total": None if d_total is None else torch.tensor(d_total),
            "loss/g_reconstruction": torch.tensor(g_total)}


def test_a_healthy_run_passes_and_an_explosion_stops_at_its_step() -> None:
    """Pretraining, then the discriminator's terms joining (a few times the magnitude): no stop. Then the WGAN terms
    at 1e19, as optim.lr=1e9 makes them: a stop naming the step and the learning rate."""
    watch = DivergenceWatch(lr=1e9, pretrain_steps=8)
    healthy = [logs(g) for g in (95.0, 60.0, 40.0, 30.0)] + [logs(g, d) for g, d in ((28.0, -40.0), (25.0, 80.0),
                                                                                    (22.0, -15.0), (3.0, 0.5))]
    for step, values in enumerate(healthy, 1):
        watch.losses(2 * step, values)
    with pytest.raises(DivergedError) as raised:
        watch.losses(18, logs(1e19, -3e19))
    message = str(raised.value)
    assert message.startswith("the losses diverged at step 18: their magnitude 4e+19 is ") and "\n" not in message
    assert "the learning rate is the likely cause (optim.lr=1e+09)" in message


def test_the_level_is_built_before_anything_is_judged() -> None:
    """The first MIN_HISTORY logged steps only build the level: a first loss of 1e4 after a random start is no stop."""
    watch = DivergenceWatch(lr=1e-3, pretrain_steps=0)
    for step, g in enumerate((5.0, 1e4, 9e3, 8e3), 1):
        watch.losses(step, logs(g))
    assert watch.level == 8.5e3  # the smallest median so far: of (5, 1e4, 9e3, 8e3)


def test_validation_nan_stops_and_under_gray_is_flagged_after_pretraining() -> None:
    watch = DivergenceWatch(lr=1e9, pretrain_steps=100)
    with pytest.raises(DivergedError, match=r"^validation at step 30 is NaN \(psnr_lab; the gray baseline is 21.10"):
        watch.validation(30, {"psnr_lab": math.nan, "psnr_lab_gray": 21.1})
    assert watch.validation(100, {"psnr_lab": 15.0, "psnr_lab_gray": 21.1}) is None  # generator alone: no flag
    line = watch.validation(150, {"psnr_lab": 11.04, "psnr_lab_gray": 21.1})
    assert line.startswith("validation at step 150: psnr_lab 11.04 dB is under the gray baseline 21.10 dB")
    assert watch.worse_than_gray == line
    assert watch.validation(300, {"psnr_lab": 28.2, "psnr_lab_gray": 21.1}) is None  # it recovered: no flag kept
    assert watch.worse_than_gray is None
