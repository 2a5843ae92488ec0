"""The names of the validation metrics, their labels and which way is better, and the evaluation settings the
command line shows — no heavy imports.

The training config checks `train.best_metric` against these without importing torchmetrics or
pytorch-fid, and `colorize-dist eval --help` shows them without torch; `colorize_dist.eval.metrics` computes them
(see its docstring for the definitions).
"""

from __future__ import annotations

# Per-image metrics, averaged over images: always computed, in this order.
PER_IMAGE_METRICS = ("psnr_lab", "ssim_lab", "psnr_ab", "ssim_ab", "delta_e", "psnr_rgb", "ssim_rgb",
                     "psnr_lab_gray", "colorfulness", "colorfulness_real")
# Per-image too, but only with LPIPS weights (`--lpips-weights`).
LPIPS_METRICS = ("lpips",)
# Set-level metrics of one Inception pass, only with Inception weights (`--fid-weights`, `train.fid_weights`).
INCEPTION_METRICS = ("fid", "kid", "kid_std", "inception_score", "inception_score_std")

# Which way is better, for the metrics that can pick the best checkpoint. Left out: the gray baseline and
# the ground truth's colourfulness (they do not depend on the model) and the spreads over KID subsets and
# IS splits.
DIRECTION = {
    "psnr_lab": "max", "ssim_lab": "max", "psnr_ab": "max", "ssim_ab": "max", "delta_e": "min",
    "psnr_rgb": "max", "ssim_rgb": "max", "colorfulness": "max", "lpips": "min",
    "fid": "min", "kid": "min", "inception_score": "max",
}

LABELS = {
    "psnr_lab": "PSNR Lab (dB) ↑",
    "ssim_lab": "SSIM Lab ↑",
    "psnr_ab": "PSNR ab (dB) ↑",
    "ssim_ab": "SSIM ab ↑",
    "delta_e": "ΔE CIEDE2000 ↓",
    "psnr_rgb": "PSNR RGB (dB) ↑",
    "ssim_rgb": "SSIM RGB ↑",
    "lpips": "LPIPS (AlexNet) ↓",
    "psnr_lab_gray": "PSNR Lab, gray baseline (dB)",
    "colorfulness": "colourfulness",
    "colorfulness_real": "colourfulness, ground truth",
    "fid": "FID ↓",
    "kid": "KID ↓",
    "kid_std": "KID, std over subsets",
    "inception_score": "Inception Score ↑",
    "inception_score_std": "Inception Score, std over splits",
}

# The region of each image where skin is looked for, as (left, top, right, bottom) fractions of its side.
FACE_REGION = (0.28, 0.45, 0.72, 0.8)  # an aligned face crop's cheeks, nose and mouth
REGIONS = {"face": FACE_REGION, "frame": (0.0, 0.0, 1.0, 1.0)}
MIN_STRATUM_IMAGES = 20  # strata with fewer images show their figures but take no part in the largest gap
DEFAULT_MAX_PIXELS = 1 << 20  # colorize: pixels per band of the full-resolution work (about 180 bytes each)
