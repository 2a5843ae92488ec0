"""colorize_dist: distributed training of L→ab colorization models for face images."""

__version__ = "0.1.0"
