"""Validation metrics of a generator, computed across ranks: PSNR/SSIM in Lab, ab and RGB, ΔE, LPIPS,
colourfulness, and FID/KID/IS from one Inception pass.

Definitions (every image is the ground truth's own L with the predicted colour, compared with the ground truth):

- psnr_lab, ssim_lab: on the 3-channel Lab image in the model's normalisation (l = L/50 − 1, ab = (a, b)/110,
  so every channel spans [−1, 1]) with data_range = 2. PSNR's MSE runs over all 3 channels and all pixels
  of one image; SSIM is Wang et al.'s (11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, population
  covariances), averaged over channels and the pixels whose window fits in the image. Both are per image,
  then averaged over images: `skimage.metrics.peak_signal_noise_ratio(true, pred, data_range=2)` and
  `structural_similarity(true, pred, channel_axis=0, data_range=2, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)` give the same per-image values. L is copied from the input, so it adds no
  error but counts in the means, as in seed 001's PSNR_Lab / SSIM_Lab: they look better than the colour is.
- psnr_ab, ssim_ab: the same on the two ab channels only (data_range = 2 on ab/110, i.e. 220 in CIELAB
  units): the colour alone.
- delta_e: the CIEDE2000 colour difference ΔE00 (Sharma et al. 2005, k_L = k_C = k_H = 1) between predicted
  and true CIELAB, mean over the pixels of an image, then over images; `skimage.color.deltaE_ciede2000`
  gives the same per-pixel values. About 1 is just noticeable, above 10 a clearly different colour.
- psnr_rgb, ssim_rgb: the same as Lab on sRGB in [0, 1] with data_range = 1.
- lpips (only with LPIPS weights): LPIPS v0.1 with AlexNet (torchmetrics' implementation, see
  `colorize_dist.eval.lpips`) between predicted and true sRGB, per image then averaged.
- psnr_lab_gray: psnr_lab of the gray baseline (ab = 0), the score a model must beat.
- colorfulness, colorfulness_real: Hasler–Süsstrunk's M on 0–255 RGB, mean over images of the prediction and
  of the ground truth; a prediction far below the real one is washed out.
- fid, kid, kid_std, inception_score, inception_score_std (only with Inception weights): from one pass of
  pytorch-fid's Inception over the predictions (and the ground truth, unless cached reference statistics are
  reused), images quantised to 8 bits and resized with PIL's bicubic filter; see `colorize_dist.eval.fid`.

An RGB-output generator (color_space "rgb") predicts its own lightness: its Lab is that of its 8-bit RGB.

Each rank scores its own samples (padding copies, `valid == False`, are skipped) into float64 sums — per-image
metric sums, and for FID the count, Σx and XᵀX — that are reduced with one all-reduce. KID and IS need the
Inception outputs themselves: they are gathered to rank 0 only (float32, as computed; a gather, not an
all-gather, so no other rank holds them) with each image's place in the split, and put in the split's order, so
they are the same for any number of ranks. Rank 0 then computes FID, KID and IS once and broadcasts them.
`evaluate` also gathers to rank 0, as float64 scalars, each image's per-image metrics, those of the baselines (gray:
ab = 0; the training set's mean ab, when given) and its ground truth's skin estimate (`strata`: ITA and the skin
pixels it rests on), for the bootstrap intervals, paired comparisons and skin-tone strata of the evaluation card.
torchmetrics' functional PSNR/SSIM give the per-image values (in float64); we keep the sums rather than torchmetrics'
stateful metrics so that the result does not depend on how samples are split over ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm import tqdm

from colorize_dist.collectives import broadcast_from_rank0, gather_to_rank0, sum_over_ranks
from colorize_dist.color import denormalise_lab, normalise_ab, normalise_lab, rgb_to_lab
from colorize_dist.data.loader import ColorLoader, agree_on_outage
from colorize_dist.data.manifest import ShardsUnavailable
from colorize_dist.eval import fid
from colorize_dist.eval.lpips import load_lpips, lpips_scores
from colorize_dist.eval.names import INCEPTION_METRICS, LPIPS_METRICS, PER_IMAGE_METRICS
from colorize_dist.eval.strata import skin_estimate
from colorize_dist.models.spaces import CHANNELS, to_rgb

LAB_DATA_RANGE = 2.0  # every normalised Lab channel spans [−1, 1]
RGB_DATA_RANGE = 1.0
SSIM_SIGMA = 1.5
SSIM_BORDER = int(3.5 * SSIM_SIGMA + 0.5)  # radius of the Gaussian window (truncated at 3.5σ, as skimage's)
_SPACE_BY_CHANNELS = {channels: space for space, channels in CHANNELS.items()}
_POOL, _LOGITS = fid.FEATURE_DIM, fid.FEATURE_DIM + fid.LOGITS_DIM  # column ends in the gathered Inception rows

log = logging.getLogger(__name__)
_WARNED_COUNTS: set[int] = set()


def colorize_batch(generator: Callable[[torch.Tensor], torch.Tensor], l: torch.Tensor,
                   color_space: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's colourisation of normalised L (N, 1, H, W): (normalised Lab (N, 3, H, W), RGB in [0, 1]).

    `generator`: the PyTorch module or an `OnnxGenerator` (colorize_dist.models.export).
    The output's space follows from its channels (2: ab, 3: rgb); `color_space`, if given, must agree.
    """
    output = generator(l).float()
    space = _SPACE_BY_CHANNELS.get(output.shape[1])
    if space is None or (color_space is not None and space != color_space):
        expected = [color_space] if color_space is not None else list(CHANNELS)
        raise ValueError(f"generator output has {output.shape[1]} channels; expected "
                         f"{' or '.join(f'{CHANNELS[s]} ({s})' for s in expected)}")
    rgb = to_rgb(l, output, space).clamp(0.0, 1.0)
    if space == "ab":
        return torch.cat([l.float(), output], dim=1), rgb
    rgb8 = (rgb * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return normalise_lab(rgb_to_lab(rgb8)), rgb


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


def ciede2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float64 CIEDE2000 ΔE00 between CIELAB images (N, 3, H, W), k_L = k_C = k_H = 1.

    Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes"; hues in
    radians, a zero chroma giving hue 0 and no hue difference, as in their notes.
    """
    l1, a1, b1 = lab1.double().unbind(1)
    l2, a2, b2 = lab2.double().unbind(1)
    chroma_mean = 0.5 * (torch.hypot(a1, b1) + torch.hypot(a2, b2))
    g = 0.5 * (1.0 - _chroma_weight(chroma_mean))
    a1, a2 = (1.0 + g) * a1, (1.0 + g) * a2
    c1, c2 = torch.hypot(a1, b1), torch.hypot(a2, b2)
    h1, h2 = torch.atan2(b1, a1) % (2 * math.pi), torch.atan2(b2, a2) % (2 * math.pi)
    achromatic = c1 * c2 == 0

    dh = h2 - h1
    dh = torch.where(dh > math.pi, dh - 2 * math.pi, torch.where(dh < -math.pi, dh + 2 * math.pi, dh))
    dh = torch.where(achromatic, torch.zeros_like(dh), dh)
    d_l, d_c, d_h = l2 - l1, c2 - c1, 2.0 * torch.sqrt(c1 * c2) * torch.sin(dh / 2)

    l_mean, c_mean, h_sum = 0.5 * (l1 + l2), 0.5 * (c1 + c2), h1 + h2
    h_mean = torch.where((h1 - h2).abs() <= math.pi, h_sum / 2,
                         torch.where(h_sum < 2 * math.pi, (h_sum + 2 * math.pi) / 2, (h_sum - 2 * math.pi) / 2))
    h_mean = torch.where(achromatic, h_sum, h_mean)
    t = (1.0 - 0.17 * torch.cos(h_mean - math.radians(30)) + 0.24 * torch.cos(2 * h_mean)
         + 0.32 * torch.cos(3 * h_mean + math.radians(6)) - 0.20 * torch.cos(4 * h_mean - math.radians(63)))
    rotation = math.radians(30) * torch.exp(-(((torch.rad2deg(h_mean) - 275.0) / 25.0) ** 2))
    r_t = -torch.sin(2 * rotation) * 2.0 * _chroma_weight(c_mean)
    s_l = 1.0 + 0.015 * (l_mean - 50.0) ** 2 / torch.sqrt(20.0 + (l_mean - 50.0) ** 2)
    s_c, s_h = 1.0 + 0.045 * c_mean, 1.0 + 0.015 * c_mean * t
    return torch.sqrt((d_l / s_l) ** 2 + (d_c / s_c) ** 2 + (d_h / s_h) ** 2 + r_t * (d_c / s_c) * (d_h / s_h))


def _chroma_weight(chroma: torch.Tensor) -> torch.Tensor:
    """√(C⁷ / (C⁷ + 25⁷)), CIEDE2000's chroma weighting."""
    c7 = chroma**7
    return torch.sqrt(c7 / (c7 + 25.0**7))


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
    scores = {
        "psnr_lab": psnr(pred_lab, true_lab, LAB_DATA_RANGE),
        "ssim_lab": ssim(pred_lab, true_lab, LAB_DATA_RANGE),
        "psnr_ab": psnr(pred_lab[:, 1:], true_lab[:, 1:], LAB_DATA_RANGE),
        "ssim_ab": ssim(pred_lab[:, 1:], true_lab[:, 1:], LAB_DATA_RANGE),
        "delta_e": ciede2000(denormalise_lab(pred_lab), denormalise_lab(true_lab)).mean(dim=(1, 2)),
        "psnr_rgb": psnr(pred_rgb, true_rgb, RGB_DATA_RANGE),
        "ssim_rgb": ssim(pred_rgb, true_rgb, RGB_DATA_RANGE),
        "psnr_lab_gray": psnr(gray_lab, true_lab, LAB_DATA_RANGE),
        "colorfulness": colorfulness(pred_rgb),
        "colorfulness_real": colorfulness(true_rgb),
    }
    return torch.stack([scores[name] for name in PER_IMAGE_METRICS], dim=1)


@dataclass
class Evaluation:
    """One pass of `evaluate`: the metrics on every rank; each image's values on rank 0 alone (None elsewhere)."""

    metrics: dict[str, float]  # compute_metrics' dict
    per_image: dict[str, np.ndarray] | None  # each per-image metric (n,) float64, images in the split's order
    ita: np.ndarray | None  # (n,) each ground truth's ITA in degrees (`strata`), NaN where undetermined
    # (these three None on the other ranks, and everywhere when evaluate(per_image=False), as for compute_metrics)
    baselines: dict[str, dict[str, np.ndarray]] | None = None  # BASELINES' per-image metrics, as `per_image`
    skin: dict[str, np.ndarray] | None = None  # (n,) the skin pixels each ITA rests on ("pixels") and their share
    # of the region ("fraction")
    fid_se: float | None = None  # FID's jackknife standard error, when asked for (every rank)


def compute_metrics(generator: nn.Module, loader: ColorLoader, *, device: torch.device | str,
                    fid_weights: str | Path | None = None, fid_reference: str | Path | None = None,
                    lpips_weights: str | Path | None = None, progress: bool = False) -> dict[str, float]:
    """The module docstring's metrics over one pass of `loader` (epoch 0), the same dict on every rank.

    Every rank must call it when torch.distributed is initialised. `fid_weights`: pytorch-fid's Inception
    file; None skips FID, KID and IS. `fid_reference`: an .npz of the ground truth's statistics and features,
    read if it exists, else computed and written (rank 0). `lpips_weights`: torchvision's AlexNet file; None
    skips LPIPS. The generator is scored in eval mode and put back as it was. Keys come in the order of
    `colorize_dist.eval.names`.
    """
    return evaluate(generator, loader, device=device, fid_weights=fid_weights, fid_reference=fid_reference,
                    lpips_weights=lpips_weights, per_image=False, progress=progress).metrics


def evaluate(generator: nn.Module, loader: ColorLoader, *, device: torch.device | str,
             fid_weights: str | Path | None = None, fid_reference: str | Path | None = None,
             lpips_weights: str | Path | None = None, per_image: bool = True, fid_standard_error: bool = False,
             mean_ab: tuple[float, float] | None = None, skin_region: str = "face",
             progress: bool = False) -> Evaluation:
    """`compute_metrics`, with (`per_image`) each image's per-image metrics, its baselines' (gray, and the
    constant `mean_ab` in CIELAB units when given) and its skin estimate in `skin_region` (`names.REGIONS`)
    gathered to rank 0 (scalars, never images), and with `fid_standard_error` (and Inception weights) FID's
    jackknife standard error."""
    device = torch.device(device)
    inception = fid.load_inception(fid_weights, device) if fid_weights is not None else None
    lpips_net = load_lpips(lpips_weights, device) if lpips_weights is not None else None
    reuse_reference = inception is not None and fid_reference is not None and Path(fid_reference).is_file()
    names = PER_IMAGE_METRICS + (LPIPS_METRICS if lpips_net is not None else ())
    sums = {"count": torch.zeros((), dtype=torch.float64, device=device),
            "per_image": torch.zeros(len(names), dtype=torch.float64, device=device)}
    if inception is not None:
        sums.update({f"fake_{name}": value for name, value in fid.empty_sums(device).items()})
        if not reuse_reference:
            sums.update({f"real_{name}": value for name, value in fid.empty_sums(device).items()})
    baselines = ("gray", "mean_ab") if mean_ab is not None else ("gray",)
    image_rows: list[torch.Tensor] = []  # per batch, float64: per-image metrics, then each baseline's | ITA, skin
    inception_rows: list[torch.Tensor] = []  # per batch, float32: fake pool features | fake logits [| real pool]
    positions: list[torch.Tensor] = []  # per batch: each image's place in the split, to put the rows in its order

    was_training = generator.training
    generator.eval()
    unavailable = None
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
                scores = per_image_scores(l, ab, pred_lab, pred_rgb, true_rgb)
                if lpips_net is not None:
                    scores = torch.cat([scores, lpips_scores(lpips_net, pred_rgb, true_rgb)[:, None]], dim=1)
                sums["count"] += len(l)
                sums["per_image"] += scores.sum(dim=0)
                positions.append(torch.from_numpy(batch.positions[batch.slots.valid]).to(device))
                if per_image:
                    columns = [scores]
                    for baseline in baselines:
                        base_lab, base_rgb = baseline_batch(l, None if baseline == "gray" else mean_ab)
                        columns.append(per_image_scores(l, ab, base_lab, base_rgb, true_rgb))
                        if lpips_net is not None:
                            columns.append(lpips_scores(lpips_net, base_rgb, true_rgb)[:, None])
                    skin = skin_estimate(denormalise_lab(torch.cat([l, ab], dim=1)), skin_region)
                    image_rows.append(torch.cat([*columns, torch.stack(skin, dim=1).to(scores.device)], dim=1))
                if inception is not None:
                    outputs = list(fid.inception_outputs(inception, pred_rgb))
                    fid.accumulate(_stats(sums, "fake"), outputs[0])  # in place: the views share sums' tensors
                    if not reuse_reference:
                        outputs.append(fid.inception_outputs(inception, true_rgb)[0])
                        fid.accumulate(_stats(sums, "real"), outputs[-1])
                    inception_rows.append(torch.cat(outputs, dim=1))
    except ShardsUnavailable as exc:  # the server stopped answering: every rank hears of it before reducing
        unavailable = exc
    finally:
        generator.train(was_training)
    agree_on_outage(loader, unavailable)

    sums = sum_over_ranks(sums)
    count = int(sums["count"].item())  # at least 1: a loader refuses a split with fewer images than ranks
    metrics = dict(zip(names, (sums["per_image"] / count).tolist(), strict=True))
    order = None  # on rank 0: the gathered rows → the split's order, the same for any number of ranks
    if per_image or inception is not None:
        gathered_positions = gather_to_rank0(_rows(positions, 0, torch.int64, device))
        order = None if gathered_positions is None else torch.argsort(gathered_positions)
    image_width = len(names) * (1 + len(baselines))
    gathered = _in_order(gather_to_rank0(_rows(image_rows, image_width + 3, torch.float64, device)), order) \
        if per_image else None
    columns = None if gathered is None else gathered.cpu().numpy().T
    values = None if columns is None else dict(zip(names, columns[:len(names)], strict=True))
    baseline_values = None if columns is None else {
        baseline: dict(zip(names, columns[len(names) * (1 + i):len(names) * (2 + i)], strict=True))
        for i, baseline in enumerate(baselines)}
    ita = None if columns is None else columns[image_width]
    skin = None if columns is None else {"pixels": columns[image_width + 1], "fraction": columns[image_width + 2]}
    fid_se = None
    if inception is not None:
        width = _LOGITS + (0 if reuse_reference else fid.FEATURE_DIM)
        features = _in_order(gather_to_rank0(_rows(inception_rows, width, torch.float32, device)), order)
        inception_metrics, fid_se = _inception_metrics(sums, features, fid_weights, fid_reference, reuse_reference,
                                                       count, image_size, fid_standard_error)
        metrics.update(inception_metrics)
    return Evaluation(metrics=metrics, per_image=values, ita=ita, baselines=baseline_values, skin=skin, fid_se=fid_se)


def baseline_batch(l: torch.Tensor, mean_ab: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A trivial colourisation of normalised L (N, 1, H, W): ab = 0 (gray) or the constant `mean_ab` (CIELAB
    units); as (normalised Lab, RGB in [0, 1]), as `colorize_batch` gives the model's."""
    ab = torch.zeros((len(l), 2, *l.shape[-2:]), dtype=l.dtype, device=l.device)
    if mean_ab is not None:
        ab += normalise_ab(torch.tensor(mean_ab, dtype=l.dtype, device=l.device)[None, :, None, None])
    return torch.cat([l, ab], dim=1), to_rgb(l, ab, "ab").clamp(0.0, 1.0)


def _rows(parts: list[torch.Tensor], width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The batches' rows (n, width) in one tensor; `width` 0: a column of scalars (n,)."""
    if parts:
        return torch.cat(parts)
    return torch.zeros((0, width) if width else (0,), dtype=dtype, device=device)


def _in_order(rows: torch.Tensor | None, order: torch.Tensor | None) -> torch.Tensor | None:
    return rows if rows is None or order is None else rows[order]


def _stats(sums: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name: sums[f"{prefix}_{name}"] for name in ("count", "sum", "gram")}


def _inception_metrics(sums: dict[str, torch.Tensor], gathered: torch.Tensor | None, weights: str | Path,
                       reference: str | Path | None, reuse_reference: bool, count: int, image_size: tuple[int, int],
                       standard_error: bool) -> tuple[dict[str, float], float | None]:
    """FID, KID and IS (and FID's standard error if asked) from the reduced sums and the rows gathered on rank 0:
    rank 0 computes them (and reads or writes the reference file), every rank gets the values, or the same error."""
    outcome: list[tuple[dict[str, float], float | None] | str | None] = [None]
    if gathered is not None:  # rank 0
        try:
            sha256 = fid.weights_info(weights)["weights_sha256"]
            if reuse_reference:
                *real, real_features = fid.load_reference(reference, count=count, image_size=image_size,
                                                          weights_sha256=sha256)
                real_features = real_features.to(gathered.device)
                real_sums = fid.sums_from_gaussian(*real, count, device=gathered.device)
            else:
                real, real_features = fid.gaussian_from_sums(_stats(sums, "real")), gathered[:, _LOGITS:]
                real_sums = _stats(sums, "real")
                if reference is not None:
                    fid.save_reference(reference, *real, real_features, image_size=image_size, weights_sha256=sha256)
            kid = fid.kernel_inception_distance(gathered[:, :_POOL], real_features)
            score = fid.inception_score(gathered[:, _POOL:_LOGITS])
            values = (fid.frechet_distance(fid.gaussian_from_sums(_stats(sums, "fake")), tuple(real)), *kid, *score)
            fid_se = (fid.frechet_standard_error(_stats(sums, "fake"), real_sums, gathered[:, :_POOL], real_features)
                      if standard_error else None)
            outcome = [(dict(zip(INCEPTION_METRICS, values, strict=True)), fid_se)]
            if (warning := fid.sample_size_warning(count)) is not None and count not in _WARNED_COUNTS:
                _WARNED_COUNTS.add(count)  # once per process and set size, not at every validation
                log.warning(warning)
        except (ValueError, OSError) as exc:
            outcome = [f"FID failed: {exc}"]
    broadcast_from_rank0(outcome)  # also orders every rank after the reference file is written
    if isinstance(outcome[0], str):
        raise ValueError(outcome[0])
    return outcome[0]
