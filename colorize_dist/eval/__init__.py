"""Evaluation and inference: distributed PSNR/SSIM/colourfulness/FID, `colorize-dist eval` and `colorize`."""

from colorize_dist.eval.metrics import PER_IMAGE_METRICS, colorfulness, colorize_batch, compute_metrics

__all__ = ["PER_IMAGE_METRICS", "colorfulness", "colorize_batch", "compute_metrics"]
