"""bench train: MFU is training/costs.py's formula (model FLOPs per image × images/s over the peak)."""

from __future__ import annotations

import pytest
import torch

from colorize_dist.bench import train as bench_train
from colorize_dist.training import costs
from colorize_dist.training.config import load_training_config


def test_mfu_against_a_given_peak_is_model_flops_over_it():
    cfg = load_training_config("res256", ["train.batch_size=32"])
    flops = costs.point_cost(cfg).flops_per_image
    assert bench_train.mfu(cfg, 100.0, "bf16", peak_tflops=400.0) == pytest.approx(100.0 * flops / 400e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_mfu_on_the_cpu_is_none():
    assert bench_train.mfu(load_training_config("res256"), 50.0, "bf16") is None
