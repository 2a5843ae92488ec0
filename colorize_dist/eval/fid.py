"""Inception metrics from one pass: FID, KID and Inception Score, with pytorch-fid's Inception from local weights.

The network is pytorch-fid's FID Inception (the TF graph of 2015-12-05 that FID, KID and IS are defined on),
built here from torchvision's Inception3 and pytorch-fid's public FID blocks, exactly as
`pytorch_fid.inception.fid_inception_v3()` builds it, and loaded from a local file (never downloaded).
One forward gives both outputs: the 2048-d pool features (FID, KID) and the 1008 logits for IS, taken as
pool · Wᵀ without the bias, as the original IS code (and torch-fidelity's "logits_unbiased") does.

Input preparation follows clean-fid (Parmar et al., CVPR 2022), which showed that the resize filter moves
FID by several points: images are quantised to 8 bits (as saved images would be), resized to 299×299 with
PIL's bicubic filter — antialiased when shrinking, a = −0.5; `F.interpolate(..., "bicubic", antialias=True)`
in float64 matches `PIL.Image.resize(..., BICUBIC)` on float images to 2e-5 of 255 — and clamped to
[0, 255]. pytorch-fid's own wrapper resizes bilinearly without antialiasing instead.

- FID: per-rank float64 sums (n, Σx, XᵀX) reduced exactly in one all-reduce (StyleGAN instead gathers every
  rank's features to every rank before accumulating its float64 moments);
  μ = Σx / n and Σ = (XᵀX − n·μμᵀ) / (n − 1), the unbiased covariance of pytorch-fid's `np.cov`; the
  Fréchet distance is pytorch-fid's `calculate_frechet_distance`.
- KID (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³,
  mean and std over 100 random subsets of min(1000, n) images — torch-fidelity's protocol and seed, in
  float64. It needs the features themselves: they are gathered exactly, in the global sample order.
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) ‖ p(y))) over 10 splits of the shuffled predictions, mean
  and std over splits — torch-fidelity's protocol and seed, from the gathered logits.
- FID's standard error (`colorize-dist eval`): the delete-a-group jackknife. The images are dealt into 10
  groups by RandomState(2020).permutation (each image's prediction and ground truth together); FID₋g is the
  FID (pytorch-fid's, as the value itself) of the sums less group g's, and SE = √((G − 1)/G · Σ_g (FID₋g −
  mean)²): ten more 2048² matrix square roots, on rank 0. KID reports the std over its 100 subsets instead,
  the spread of one 1000-image estimate.

FID is biased upward at small N (Chong & Forsyth 2020): below 10,000 images the values are not comparable
with published ones, and below 2,048 (the feature dimension) the covariance is singular.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
)
from torch import nn
from torch.nn import functional as F

from colorize_dist.files import atomic_path, first_line

FID_WEIGHTS_FILENAME = FID_WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth
FEATURE_DIM = 2048  # Inception's final average pool, the standard FID and KID features
LOGITS_DIM = 1008  # the 2015 graph's classifier: 1000 ImageNet classes and 8 unused
INPUT_SIZE = 299
RESIZE_FILTER = "PIL bicubic (antialiased, a = -0.5) of the 8-bit image to 299×299, clamped to [0, 255]"
KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS, SEED = 100, 1000, 10, 2020  # torch-fidelity's defaults
JACKKNIFE_GROUPS = 10  # FID's standard error
FID_SE_METHOD = (f"delete-a-group jackknife over {JACKKNIFE_GROUPS} groups of images (RandomState({SEED}) "
                 "permutation, prediction and ground truth of an image together)")
MIN_IMAGES = FEATURE_DIM  # fewer: the feature covariance is singular
RECOMMENDED_IMAGES = 10_000  # fewer: FID is biased upward and not comparable with published values


def fid_weights_path(path: str | Path | None = None) -> Path:
    """`path` if given, else the torch hub cache: $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth."""
    return Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


class FIDInception(nn.Module):
    """pytorch-fid's FID Inception: `forward(x)` maps RGB (N, 3, 299, 299) in [0, 1] to (pool features, logits)."""

    STAGES = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                              num_classes=LOGITS_DIM)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = 2.0 * x - 1.0  # pytorch-fid's input normalisation
        for name in self.STAGES:
            x = getattr(self.net, name)(x)
        pool = x.flatten(1)
        return pool, pool @ self.net.fc.weight.T


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> FIDInception:
    """The FID Inception in eval mode, from a local file (the torch hub cache when `path` is None).

    Never downloads (training nodes often have no network, and a download per rank is worse): a missing
    file raises FileNotFoundError naming it and where to put it. Cached per (file, device), since the
    trainer evaluates periodically.
    """
    return _load_inception(_existing_weights(path), str(torch.device(device)))


@functools.cache
def _load_inception(file: Path, device: str) -> FIDInception:
    inception = FIDInception()
    try:
        inception.net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"FID Inception weights at {file} cannot be loaded ({first_line(exc)}); download "
                         f"{FID_WEIGHTS_URL} again") from None
    return inception.to(device).eval().requires_grad_(False)


def weights_info(path: str | Path | None = None) -> dict[str, str]:
    """The Inception weights file and its SHA-256, for metrics.json and cached reference statistics."""
    file = _existing_weights(path)
    return {"weights": str(file), "weights_sha256": _sha256(file)}


def _existing_weights(path: str | Path | None) -> Path:
    file = fid_weights_path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {file}: download {FID_WEIGHTS_URL} to "
                                f"{fid_weights_path(None)} (the torch hub cache) or pass its path with --fid-weights")
    return file


@functools.cache
def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_for_inception(rgb: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) in [0, 1] → 8-bit quantised, PIL-bicubic resized (N, 3, 299, 299) float32 in [0, 1]."""
    quantised = (rgb.double().clamp(0.0, 1.0) * 255.0).round()
    if quantised.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        quantised = F.interpolate(quantised, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0.0, 255.0)
    return (quantised / 255.0).float()


def inception_outputs(inception: FIDInception, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool features (N, 2048), unbiased logits (N, 1008)), float32, of RGB (N, 3, H, W) in [0, 1]."""
    with torch.no_grad(), ieee_fp32(), torch.autocast(rgb.device.type, enabled=False):
        return inception(resize_for_inception(rgb))


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Convolutions and matrix products in full fp32, without TF32 (cuDNN's default for convolutions, and
    torch's for products where a run enables it): a GPU's features then equal a CPU's up to the order of sums,
    as reference statistics computed on either assume."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, before, strict=True):
            backend.fp32_precision = precision


def inception_features(inception: FIDInception, rgb: torch.Tensor) -> torch.Tensor:
    """(N, 2048) float64 pool features of RGB (N, 3, H, W) in [0, 1]."""
    return inception_outputs(inception, rgb)[0].double()


def empty_sums(device: torch.device | str, dim: int = FEATURE_DIM) -> dict[str, torch.Tensor]:
    """Zeroed float64 sums of a feature set: "count", "sum" (Σx) and "gram" (XᵀX)."""
    return {"count": torch.zeros((), dtype=torch.float64, device=device),
            "sum": torch.zeros(dim, dtype=torch.float64, device=device),
            "gram": torch.zeros(dim, dim, dtype=torch.float64, device=device)}


def accumulate(sums: dict[str, torch.Tensor], features: torch.Tensor) -> None:
    """Add the rows of `features` (N, D) to `sums` in place."""
    features = features.double()
    sums["count"] += features.shape[0]
    sums["sum"] += features.sum(0)
    sums["gram"].addmm_(features.T, features)


def gaussian_from_sums(sums: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of the features summed in `sums`, as float64 numpy arrays; Σ is unbiased like `np.cov`."""
    count = float(sums["count"])
    if count < 2:
        raise ValueError(f"FID needs at least 2 images, got {count:.0f}")
    mean = sums["sum"].cpu().numpy() / count
    covariance = (sums["gram"].cpu().numpy() - count * np.outer(mean, mean)) / (count - 1)
    return mean, covariance


def sums_from_gaussian(mean: np.ndarray, covariance: np.ndarray, count: int,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The sums (count, Σx, XᵀX) that `gaussian_from_sums` turns into (μ, Σ): for reference statistics."""
    mean64 = torch.from_numpy(np.asarray(mean, dtype=np.float64)).to(device)
    covariance64 = torch.from_numpy(np.asarray(covariance, dtype=np.float64)).to(device)
    return {"count": torch.tensor(float(count), dtype=torch.float64, device=device), "sum": count * mean64,
            "gram": (count - 1) * covariance64 + count * torch.outer(mean64, mean64)}


def frechet_distance(fake: tuple[np.ndarray, np.ndarray], real: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between two Gaussians (μ, Σ), by pytorch-fid's own implementation."""
    return float(calculate_frechet_distance(fake[0], fake[1], real[0], real[1]))


def frechet_standard_error(fake_sums: dict[str, torch.Tensor], real_sums: dict[str, torch.Tensor],
                           fake: torch.Tensor, real: torch.Tensor, groups: int = JACKKNIFE_GROUPS,
                           seed: int = SEED) -> float:
    """FID's delete-a-group jackknife standard error, from the full sums and the features (n, d) they sum.

    Row i of `fake` and of `real` leave together (the prediction and the ground truth of image i); groups
    are the `groups` near-equal parts of RandomState(seed).permutation(n).
    """
    count = len(fake)
    if len(real) != count:
        raise ValueError(f"FID's jackknife pairs predictions with ground truths; got {count} and {len(real)}")
    if count < max(groups, 3):
        raise ValueError(f"FID's jackknife over {groups} groups needs at least {max(groups, 3)} images, got {count}")
    replicates = []
    for part in np.array_split(np.random.RandomState(seed).permutation(count), groups):
        rows = torch.from_numpy(part).to(fake.device)
        kept = [_without(sums, features[rows]) for sums, features in ((fake_sums, fake), (real_sums, real))]
        replicates.append(frechet_distance(*(gaussian_from_sums(sums) for sums in kept)))
    spread = np.asarray(replicates) - np.mean(replicates)
    return float(np.sqrt((groups - 1) / groups * (spread @ spread)))


def _without(sums: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    left_out = empty_sums(sums["sum"].device, dim=sums["sum"].shape[0])
    accumulate(left_out, rows)
    return {name: sums[name] - left_out[name] for name in ("count", "sum", "gram")}


def kernel_inception_distance(fake: torch.Tensor, real: torch.Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = SEED) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets of the unbiased MMD² between feature sets (n, d) and (m, d).

    Subsets hold min(subset_size, n, m) rows, drawn without replacement by NumPy's RandomState(seed) in
    torch-fidelity's order (fake, then real, per subset); the kernel is (xᵀy/d + 1)³, in float64.
    """
    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(fake)} and {len(real)}")
    fake, real = fake.double(), real.double()
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = fake[torch.from_numpy(rng.choice(len(fake), size, replace=False)).to(fake.device)]
        y = real[torch.from_numpy(rng.choice(len(real), size, replace=False)).to(real.device)]
        k_xx, k_yy, k_xy = (_cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (size * (size - 1))
        values.append((within - 2.0 * k_xy.mean()).item())
    return float(np.mean(values)), float(np.std(values))


def _cubic_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = SEED) -> tuple[float, float]:
    """(mean, std) over `splits` of exp(E KL(p(y|x) ‖ p(y))) for logits (N, C), shuffled by RandomState(seed).

    min(splits, N) splits of N·i // splits … rows, as torch-fidelity's `isc_features_to_metric`; float64.
    log p(y) is a log-sum-exp, so that probabilities underflowing to 0 add 0 (torch-fidelity's p.mean().log()
    gives NaN there; elsewhere the two agree to rounding).
    """
    count = len(logits)
    if count < 1:
        raise ValueError("the Inception Score needs at least 1 image")
    splits = min(splits, count)
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(count)).to(logits.device)].double()
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        chunk = log_p[i * count // splits:(i + 1) * count // splits]
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(len(chunk))  # log p(y), without underflow
        scores.append((chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def sample_size_warning(count: int) -> str | None:
    """Why FID/KID/IS over `count` images should not be compared with published values, or None."""
    if count >= RECOMMENDED_IMAGES:
        return None
    reason = (f"the {FEATURE_DIM}×{FEATURE_DIM} feature covariance is singular below {MIN_IMAGES:,} images"
              if count < MIN_IMAGES else "FID is biased upward at small N")
    return (f"FID/KID/IS over {count:,} images: {reason}; compare them only with values over the same images, "
            f"not with published ones (use at least {RECOMMENDED_IMAGES:,})")


def save_reference(path: str | Path, mean: np.ndarray, covariance: np.ndarray, features: torch.Tensor, *,
                   image_size: tuple[int, int], weights_sha256: str) -> None:
    """Write the ground truth's Gaussian (pytorch-fid's .npz keys mu, sigma) and features (for KID) atomically,
    with what they were made from: image count and size, Inception weights, resize filter."""
    with atomic_path(path) as temporary:
        np.savez(temporary, mu=mean, sigma=covariance, features=features.float().cpu().numpy(),
                 count=len(features), image_size=np.array(image_size), weights_sha256=weights_sha256,
                 resize=RESIZE_FILTER)


def load_reference(path: str | Path, *, count: int, image_size: tuple[int, int],
                   weights_sha256: str) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(μ, Σ, features) from `save_reference`'s file, refusing statistics made from anything else."""
    path = Path(path)
    try:
        with np.load(path) as stats:
            mean, covariance, features = stats["mu"], stats["sigma"], torch.from_numpy(stats["features"])
            made_from = (int(stats["count"]), tuple(int(side) for side in stats["image_size"]),
                         str(stats["weights_sha256"]), str(stats["resize"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"FID reference statistics {path} are unreadable or from an older version "
                         f"({first_line(exc)}); delete the file to recompute them") from None
    if made_from[:2] != (count, tuple(image_size)):
        raise ValueError(f"FID reference statistics {path} were computed on {made_from[0]} images of "
                         f"{made_from[1][0]}×{made_from[1][1]}, but this set has {count} of "
                         f"{image_size[0]}×{image_size[1]}; delete the file or pass another --fid-reference")
    if made_from[2:] != (weights_sha256, RESIZE_FILTER):
        raise ValueError(f"FID reference statistics {path} were computed with other Inception weights or another "
                         "resize filter; delete the file or pass another --fid-reference")
    return mean, covariance, features
