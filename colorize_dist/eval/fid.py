"""FID pieces: pytorch-fid's Inception network from local weights, Gaussian statistics from per-rank sums,
cached reference statistics, and the Fréchet distance itself (pytorch-fid's `calculate_frechet_distance`).

Statistics are accumulated as float64 sums — the count n, Σx and the Gram matrix XᵀX — because sums reduce
across ranks exactly and in one all-reduce, whatever the split (StyleGAN's approach). From them
μ = Σx / n and Σ = (XᵀX − n·μμᵀ) / (n − 1), the unbiased covariance that pytorch-fid's `np.cov` computes.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torch import nn

FID_WEIGHTS_FILENAME = FID_WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth
FEATURE_DIM = 2048  # Inception's final average pool, the standard FID features


def fid_weights_path(path: str | Path | None = None) -> Path:
    """`path` if given, else the torch hub cache: $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth."""
    return Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool features of RGB in [0, 1]) in eval mode, from a local file.

    Never downloads (training nodes often have no network, and a download per rank is worse): a missing
    file raises FileNotFoundError naming it and where to put it. Cached per (file, device), since the
    trainer evaluates periodically.
    """
    file = fid_weights_path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {file}: download {FID_WEIGHTS_URL} to "
                                f"{fid_weights_path(None)} (the torch hub cache) or pass its path with --fid-weights")
    return _load_inception(file, str(torch.device(device)))


@functools.cache
def _load_inception(file: Path, device: str) -> nn.Module:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        # pytorch-fid's fid_inception_v3() takes its weights only from `load_state_dict_from_url`, which downloads
        # when the hub cache lacks them; hand it this file's state dict (its strict load_state_dict still runs).
        with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", lambda url, **kwargs: state):
            inception = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"FID Inception weights at {file} cannot be loaded ({reason}); download "
                         f"{FID_WEIGHTS_URL} again") from None
    return inception.to(device).eval()


def inception_features(inception: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """(N, 2048) float64 features of RGB (N, 3, H, W) in [0, 1], quantised to 8 bits first.

    Quantising makes the statistics those pytorch-fid computes from the same images saved as PNGs.
    """
    with torch.no_grad():
        quantised = (rgb.float().clamp(0.0, 1.0) * 255.0).round() / 255.0
        return inception(quantised)[0].flatten(1).double()


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


def frechet_distance(fake: tuple[np.ndarray, np.ndarray], real: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between two Gaussians (μ, Σ), by pytorch-fid's own implementation."""
    return float(calculate_frechet_distance(fake[0], fake[1], real[0], real[1]))


def save_reference(path: str | Path, mean: np.ndarray, covariance: np.ndarray, *, count: int,
                   image_size: tuple[int, int]) -> None:
    """Write reference statistics atomically as pytorch-fid's .npz (mu, sigma) plus what they were made from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(temporary, mu=mean, sigma=covariance, count=count, image_size=np.array(image_size))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_reference(path: str | Path, *, count: int, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) from `save_reference`'s file, refusing statistics of another image count or size."""
    path = Path(path)
    try:
        with np.load(path) as stats:
            mean, covariance = stats["mu"], stats["sigma"]
            made_from = int(stats["count"]), tuple(int(side) for side in stats["image_size"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"FID reference statistics {path} are unreadable ({exc}); delete the file to "
                         "recompute them") from None
    if made_from != (count, tuple(image_size)):
        raise ValueError(f"FID reference statistics {path} were computed on {made_from[0]} images of "
                         f"{made_from[1][0]}×{made_from[1][1]}, but this set has {count} of "
                         f"{image_size[0]}×{image_size[1]}; delete the file or pass another --fid-reference")
    return mean, covariance
