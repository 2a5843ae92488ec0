"""`accelerate launch colorize_dist/train.py [--config NAME|FILE] [--run-dir DIR] [--resume auto|none|PATH] [k=v ...]`

The entry point `accelerate launch` runs (also `python -m colorize_dist.train`); the command line is
colorize_dist/commands/train.py and the loop colorize_dist/training/loop.py.
"""

import sys

from colorize_dist import cli
from colorize_dist.commands import train as command

if __name__ == "__main__":
    sys.exit(cli.run("train", command.main, command.parse()))
