"""What the per-interval telemetry (training/telemetry.py) costs a training step.

The additions (forward hooks, `tick`, one logging step's exchange and record) are timed on their own, 1000 times,
rather than as the difference of two timed steps: a step's own noise on a shared machine is far larger than them.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from colorize_dist.models import build_discriminator, build_generator
from colorize_dist.training.config import check_launch, load_training_config
from colorize_dist.training.telemetry import Telemetry

FORWARDS_PER_STEP = 4  # G for D's update and G's, D on real and fake pairs, D scoring G's output: at most 4


def training_step(networks: list[torch.nn.Module], l: torch.Tensor, ab: torch.Tensor) -> Callable[[], None]:
    """G's and D's forward and backward and an Adam step of both (no data, no collective)."""
    generator, discriminator = networks
    optimizer = torch.optim.Adam([*generator.parameters(), *discriminator.parameters()], lr=1e-4)

    def step() -> None:
        fake = generator(l)
        loss = discriminator(l, fake).mean() + (fake - ab).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], object], count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def measure(config: str, steps: int) -> list[object]:
    """The table's row: config, batch, log_every, step ms, hooks + tick µs per step, logging step ms, overhead."""
    cfg = load_training_config(config)
    batch = check_launch(cfg.train, 1)
    l = torch.rand(batch, 1, cfg.data.resolution, cfg.data.resolution)
    ab = torch.rand(batch, 2, cfg.data.resolution, cfg.data.resolution)
    networks = [build_generator(cfg.model.generator),
                build_discriminator(cfg.model.discriminator, cfg.model.generator.out_channels)]
    step = training_step(networks, l, ab)
    with tempfile.TemporaryDirectory() as folder:
        telemetry = Telemetry(Path(folder), torch.device("cpu"), rank=0, world_size=1, forward_modules=networks,
                              cost=None, peak_flops=None, straggler_margin=0.5, straggler_intervals=3)
        step_times = time_steps(step, steps)  # with the hooks, as in training

        def bookkeeping() -> None:  # what each step adds: the hooks of its forward passes (4 in a GAN step), tick
            for _ in range(FORWARDS_PER_STEP):
                telemetry.forward._start(None, None)
                telemetry.forward._stop(None, None, None)
            telemetry.tick()

        per_step = time_steps(bookkeeping, 1000)
        telemetry.forward.take()
        logging_steps = []
        for _ in range(20):
            started = time.perf_counter()
            _, record = telemetry.interval({"data_wait": 0.01}, cfg.train.log_every * cfg.train.batch_size,
                                           [False, False, False], adversarial=True)
            telemetry.write({"kind": "interval", "step": 0, **record})
            logging_steps.append(time.perf_counter() - started)
    step_s, per_step_s, log_s = (statistics.median(values) for values in (step_times, per_step, logging_steps))
    interval = cfg.train.log_every
    overhead = (interval * per_step_s + log_s) / (interval * step_s)
    return [config, batch, interval, step_s * 1e3, per_step_s * 1e6, log_s * 1e3, overhead]
