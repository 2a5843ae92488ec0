"""Training: the loop (loop.py), its command line (command.py), config, checkpoints, EMA, stop requests, updates."""
