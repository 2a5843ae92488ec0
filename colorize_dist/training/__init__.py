"""The training loop's parts: config, checkpoints, EMA, stop requests, updates; the loop is colorize_dist/train.py."""
