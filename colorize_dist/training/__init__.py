"""Training: the loop (loop.py), its parts (build.py), milestones, command line, config, checkpoints, EMA, stop
requests, updates."""
