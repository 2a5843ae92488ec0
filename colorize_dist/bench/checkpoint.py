"""How long a checkpoint holds the training step: hashing, renaming and pruning on the step vs in a background thread.

One process with a preset's real networks, optimizer states and EMA, the two ways alternating so that a shared
machine's noise falls on both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tabulate import tabulate

from colorize_dist.errors import UserError
from colorize_dist.models import build_discriminator, build_generator
from colorize_dist.training import checkpoint
from colorize_dist.training.config import load_training_config
from colorize_dist.training.ema import EMA

DESCRIPTION = """\
Time how long saving a checkpoint holds the training step, with a preset's networks, optimizer states and EMA:
rank 0 hashing, renaming and pruning on the step against in a background thread. Prints a table of seconds per save
of each way. Checkpoints go to --dir (default: a temporary folder).

  colorize-dist bench checkpoint                      # res1024's networks, 3 saves of each, alternating
  colorize-dist bench checkpoint --config res256 --repeats 5
"""  # `colorize-dist bench checkpoint --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="res1024", help="preset or YAML whose networks are saved")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each variant (alternating)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = measure(args.config, Path(folder), args.repeats)
    print(tabulate(rows, ["variant", "checkpoint MiB", "step blocked s (median)", "until complete s (median)"],
                   tablefmt="github", floatfmt=(".0f", ",.0f", ".2f", ".2f")))
    return 0


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
