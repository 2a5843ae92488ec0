"""How long a checkpoint holds the training step: hashing, renaming and pruning on the step vs in a background thread.

One process with a preset's real networks, optimizer states and EMA, the two ways alternating so that a shared
machine's noise falls on both.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from colorize_dist.models import build_discriminator, build_generator
from colorize_dist.training import checkpoint
from colorize_dist.training.config import load_training_config
from colorize_dist.training.ema import EMA


def measure(config: str, root: Path, repeats: int) -> list[list]:
    """[variant, MiB, median blocking seconds, median seconds until the checkpoint is complete] per variant."""
    cfg = load_training_config(config)
    accelerator = Accelerator(cpu=True)
    generator = build_generator(cfg.model.generator)
    discriminator = build_discriminator(cfg.model.discriminator, cfg.model.generator.out_channels)
    networks = [generator, discriminator]
    optimizers = [torch.optim.Adam(net.parameters(), lr=1e-4) for net in networks]
    for net, optimizer in zip(networks, optimizers, strict=True):  # Adam's moments exist after a first step
        for param in net.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()
    prepared = accelerator.prepare(*networks, *optimizers)
    accelerator.register_for_checkpointing(EMA(generator, 0.999))
    del prepared
    timings: dict[str, tuple[list[float], list[float]]] = {"on the step": ([], []), "background": ([], [])}
    step = 0
    for _ in range(repeats):
        for variant, (blocked, complete) in timings.items():
            step += 1
            started = time.perf_counter()
            checkpoint.save_checkpoint(accelerator, root / checkpoint.step_name(step),
                                       background=variant == "background", keep=2, step=step)
            blocked.append(time.perf_counter() - started)
            checkpoint.wait_for_saves(accelerator)
            complete.append(time.perf_counter() - started)
    size = sum(path.stat().st_size for path in checkpoint.latest_valid(root, verify_hashes=False).rglob("*")) / 2**20
    return [[variant, size, statistics.median(blocked), statistics.median(complete)]
            for variant, (blocked, complete) in timings.items()]
