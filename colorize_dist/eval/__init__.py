"""Evaluation and inference: distributed metrics (`metrics`, `fid`, `lpips`), `colorize-dist eval` and `colorize`.

Importing the package is light (no torchmetrics, pytorch-fid or torchvision): import the modules you use,
e.g. `from colorize_dist.eval.metrics import compute_metrics`.
"""

from colorize_dist.eval.names import DIRECTION, INCEPTION_METRICS, LPIPS_METRICS, PER_IMAGE_METRICS

__all__ = ["DIRECTION", "INCEPTION_METRICS", "LPIPS_METRICS", "PER_IMAGE_METRICS"]
