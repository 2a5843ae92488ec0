"""Train the colorization GAN (G + D, DDP or DeepSpeed, checkpoints, resume).

    colorize-dist train [--config FILE] [--run-dir DIR] [--resume auto|none|PATH] [key=value ...]

The same command line as `accelerate launch colorize_dist/train.py` (see that file's docstring); run it
under `accelerate launch` for several processes.
"""

from colorize_dist.train import add_arguments
from colorize_dist.train import run as main

__all__ = ["add_arguments", "main"]
