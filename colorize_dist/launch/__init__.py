"""Launching training on clusters: Slurm through submitit (`colorize-dist submit`), with checkpoint and requeue."""
