"""Validation metrics of a generator, computed across ranks: PSNR/SSIM in Lab and RGB, colourfulness, FID.

Definitions (every image is the ground truth's own L with the predicted colour, compared with the ground truth):

- psnr_lab, ssim_lab: on the 3-channel Lab image in the model's normalisation (l = L/50 − 1, ab = (a, b)/110,
  so every channel spans [−1, 1]) with data_range = 2. PSNR's MSE runs over all 3 channels and all pixels
  of one image; SSIM is Wang et al.'s (11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, population
  covariances), averaged over channels and the pixels whose window fits in the image. Both are per image,
  then averaged over images: `skimage.metrics.peak_signal_noise_ratio(true, pred, data_range=2)` and
  `structural_similarity(true, pred, channel_axis=0, data_range=2, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)` give the same per-image values. L is exact, so it adds no error but
  counts in the means, as in seed 001's PSNR_Lab / SSIM_Lab.
- psnr_rgb, ssim_rgb: the same on sRGB in [0, 1] with data_range = 1.
- psnr_lab_gray: psnr_lab of the gray baseline (ab = 0), the score a model must beat.
- colorfulness, colorfulness_real: Hasler–Süsstrunk's M on 0–255 RGB, mean over images of the prediction and
  of the ground truth; a prediction far below the real one is washed out.
- fid (only with Inception weights): Fréchet distance between Inception features of the predictions and of
  the ground truth (or cached reference statistics), both quantised to 8 bits as saved images would be.

An RGB-output generator (color_space "rgb") predicts its own lightness: its Lab is that of its 8-bit RGB.

Each rank scores its own samples (padding copies, `valid == False`, are skipped) into float64 sums — per-image
metric sums, and for FID the count, Σx and XᵀX — that are reduced with one all-reduce; rank 0 then computes
the Fréchet distance once and broadcasts it. torchmetrics' functional PSNR/SSIM give the per-image values
(in float64); we keep the sums rather than torchmetrics' stateful metrics so that all statistics travel in
a single reduction and the result does not depend on how samples are split over ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from colorize_dist.color import AB_SCALE, L_SCALE, L_SHIFT, rgb_to_lab
from colorize_dist.data.loader import ColorLoader
from colorize_dist.eval import fid
from colorize_dist.models.spaces import CHANNELS, to_rgb

LAB_DATA_RANGE = 2.0  # every normalised Lab channel spans [−1, 1]
RGB_DATA_RANGE = 1.0
SSIM_SIGMA = 1.5
SSIM_BORDER = int(3.5 * SSIM_SIGMA + 0.5)  # radius of the Gaussian window (truncated at 3.5σ, as skimage's)
PER_IMAGE_METRICS = ("psnr_lab", "ssim_lab", "psnr_rgb", "ssim_rgb", "psnr_lab_gray", "colorfulness",
                     "colorfulness_real")
_SPACE_BY_CHANNELS = {channels: space for space, channels in CHANNELS.items()}


def colorize_batch(generator: nn.Module, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's colourisation of normalised L (N, 1, H, W): (normalised Lab (N, 3, H, W), RGB in [0, 1])."""
    output = generator(l).float()
    space = _SPACE_BY_CHANNELS.get(output.shape[1])
    if space is None:
        raise ValueError(f"generator output has {output.shape[1]} channels; expected one of "
                         f"{', '.join(f'{c} ({s})' for s, c in CHANNELS.items())}")
    rgb = to_rgb(l, output, space).clamp(0.0, 1.0)
    if space == "ab":
        return torch.cat([l.float(), output], dim=1), rgb
    rgb8 = (rgb * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return normalise_lab(rgb_to_lab(rgb8)), rgb


def normalise_lab(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (N, 3, H, W) → the model's normalisation, every channel in about [−1, 1]."""
    return torch.cat([lab[:, :1] * L_SCALE + L_SHIFT, lab[:, 1:] * AB_SCALE], dim=1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """(N,) float64 PSNR of each image, MSE over its channels and pixels."""
    return peak_signal_noise_ratio(pred.double(), target.double(), data_range=data_range, dim=(1, 2, 3),
                                   reduction="none")


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """(N,) float64 SSIM of each image (11×11 Gaussian window, σ = 1.5), mean over channels and valid pixels.

    torchmetrics gives the SSIM map of the reflect-padded image and, since 1.5 (its PR #2721), averages all of
    it; we average only the pixels whose window lies inside the image, as Wang et al. and skimage do.
    """
    _, ssim_map = structural_similarity_index_measure(pred.double(), target.double(), data_range=data_range,
                                                      sigma=SSIM_SIGMA, reduction="none", return_full_image=True)
    return ssim_map[..., SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER].mean(dim=(1, 2, 3))


def colorfulness(rgb: torch.Tensor) -> torch.Tensor:
    """(N,) float64 Hasler–Süsstrunk colourfulness of RGB (N, 3, H, W) in [0, 1], on the paper's 0–255 scale.

    M = σ_rgyb + 0.3·μ_rgyb with rg = R − G, yb = (R + G)/2 − B: 0 for gray, about 33 "moderately",
    above 59 "highly" colourful.
    """
    red, green, blue = (rgb.double() * 255.0).unbind(1)
    rg, yb = red - green, 0.5 * (red + green) - blue
    spread = (rg.var(dim=(1, 2), correction=0) + yb.var(dim=(1, 2), correction=0)).sqrt()
    offset = (rg.mean(dim=(1, 2)) ** 2 + yb.mean(dim=(1, 2)) ** 2).sqrt()
    return spread + 0.3 * offset


def per_image_scores(l: torch.Tensor, ab: torch.Tensor, pred_lab: torch.Tensor, pred_rgb: torch.Tensor,
                     true_rgb: torch.Tensor) -> torch.Tensor:
    """(N, len(PER_IMAGE_METRICS)) float64: every per-image metric of a batch, in PER_IMAGE_METRICS order."""
    true_lab, gray_lab = torch.cat([l, ab], dim=1), torch.cat([l, torch.zeros_like(ab)], dim=1)
    return torch.stack([
        psnr(pred_lab, true_lab, LAB_DATA_RANGE),
        ssim(pred_lab, true_lab, LAB_DATA_RANGE),
        psnr(pred_rgb, true_rgb, RGB_DATA_RANGE),
        ssim(pred_rgb, true_rgb, RGB_DATA_RANGE),
        psnr(gray_lab, true_lab, LAB_DATA_RANGE),
        colorfulness(pred_rgb),
        colorfulness(true_rgb),
    ], dim=1)


def compute_metrics(generator: nn.Module, loader: ColorLoader, *, device: torch.device | str,
                    fid_weights: str | Path | None = None, fid_reference: str | Path | None = None,
                    progress: bool = False) -> dict[str, float]:
    """The module docstring's metrics over one pass of `loader` (epoch 0), the same dict on every rank.

    Every rank must call it when torch.distributed is initialised. `fid_weights`: pytorch-fid's Inception
    file; None skips FID. `fid_reference`: an .npz of the ground truth's statistics, read if it exists,
    else computed and written (rank 0). The generator is scored in eval mode and put back as it was.
    """
    device = torch.device(device)
    inception = fid.load_inception(fid_weights, device) if fid_weights is not None else None
    reuse_reference = inception is not None and fid_reference is not None and Path(fid_reference).is_file()
    sums = {"count": torch.zeros((), dtype=torch.float64, device=device),
            "per_image": torch.zeros(len(PER_IMAGE_METRICS), dtype=torch.float64, device=device)}
    if inception is not None:
        sums.update({f"fake_{name}": value for name, value in fid.empty_sums(device).items()})
        if not reuse_reference:
            sums.update({f"real_{name}": value for name, value in fid.empty_sums(device).items()})

    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader.epoch(0), total=loader.batches_per_epoch, desc="eval", disable=not progress):
                image_size = tuple(batch.l.shape[-2:])
                keep = batch.valid.to(batch.l.device)
                l, ab = batch.l[keep].to(device).float(), batch.ab[keep].to(device).float()
                if len(l) == 0:
                    continue
                pred_lab, pred_rgb = colorize_batch(generator, l)
                true_rgb = to_rgb(l, ab, "ab")
                sums["count"] += len(l)
                sums["per_image"] += per_image_scores(l, ab, pred_lab, pred_rgb, true_rgb).sum(dim=0)
                if inception is not None:
                    _accumulate(sums, "fake", fid.inception_features(inception, pred_rgb))
                    if not reuse_reference:
                        _accumulate(sums, "real", fid.inception_features(inception, true_rgb))
    finally:
        generator.train(was_training)

    sums = _all_reduce_sum(sums)
    count = sums["count"].item()
    metrics = dict(zip(PER_IMAGE_METRICS, (sums["per_image"] / count).tolist(), strict=True))
    if inception is not None:
        metrics["fid"] = _fid(sums, fid_reference, reuse_reference, int(count), image_size)
    return metrics


def _accumulate(sums: dict[str, torch.Tensor], prefix: str, features: torch.Tensor) -> None:
    fid.accumulate(_stats(sums, prefix), features)  # in place: the views share sums' tensors


def _stats(sums: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name: sums[f"{prefix}_{name}"] for name in ("count", "sum", "gram")}


def _fid(sums: dict[str, torch.Tensor], reference: str | Path | None, reuse_reference: bool, count: int,
         image_size: tuple[int, int]) -> float:
    """FID from the reduced sums: rank 0 computes the Fréchet distance, every rank gets the value (or error)."""
    rank = dist.get_rank() if _distributed() else 0
    if reuse_reference:
        real = fid.load_reference(reference, count=count, image_size=image_size)  # every rank: same check
    else:
        real = fid.gaussian_from_sums(_stats(sums, "real"))
        if reference is not None and rank == 0:
            fid.save_reference(reference, *real, count=count, image_size=image_size)
    outcome: list[float | str | None] = [None]
    if rank == 0:
        try:
            outcome = [fid.frechet_distance(fid.gaussian_from_sums(_stats(sums, "fake")), real)]
        except ValueError as exc:
            outcome = [f"FID failed: {exc}"]
    if _distributed():
        dist.broadcast_object_list(outcome, src=0)  # also orders every rank after the reference file is written
    if isinstance(outcome[0], str):
        raise ValueError(outcome[0])
    return outcome[0]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of `sums` over ranks in one all-reduce of a flat float64 buffer."""
    if not _distributed():
        return sums
    flat = torch.cat([value.reshape(-1) for value in sums.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced, offset = {}, 0
    for name, value in sums.items():
        reduced[name] = flat[offset:offset + value.numel()].view_as(value)
        offset += value.numel()
    return reduced
