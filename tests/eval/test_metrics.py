"""Metric definitions against skimage and pytorch-fid, and FID weights loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from colorize_dist.data import DataConfig, build_loader, synth_image
from colorize_dist.eval import fid
from colorize_dist.eval.metrics import colorfulness, colorize_batch, compute_metrics, psnr, ssim
from colorize_dist.models.export import load_generator
from tests.eval.conftest import RESOLUTION


def skimage_scores(pred: np.ndarray, true: np.ndarray, data_range: float) -> tuple[float, float]:
    """The documented definition: per-image PSNR and SSIM of (3, H, W) images."""
    return (peak_signal_noise_ratio(true, pred, data_range=data_range),
            structural_similarity(true, pred, channel_axis=0, data_range=data_range, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False))


def test_psnr_ssim_match_skimage_per_image():
    generator = torch.Generator().manual_seed(0)
    true = torch.rand(3, 3, 24, 40, generator=generator) * 2 - 1
    pred = (true + 0.2 * torch.randn(true.shape, generator=generator)).clamp(-1, 1)
    ours = torch.stack([psnr(pred, true, 2.0), ssim(pred, true, 2.0)], dim=1).numpy()
    expected = [skimage_scores(p.numpy().astype(np.float64), t.numpy().astype(np.float64), 2.0)
                for p, t in zip(pred, true, strict=True)]
    np.testing.assert_allclose(ours, expected, rtol=1e-7)  # torchmetrics' PSNR uses a float32 log(10)


def test_compute_metrics_lab_and_rgb_match_skimage(val_shards: Path, generator_file: Path):
    """The dataset means equal skimage's scores averaged over the real (not padding) samples."""
    model, _, _ = load_generator(generator_file)
    cfg = DataConfig(shards=str(val_shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    loader = build_loader(cfg, "val", batch_size=4, rank=0, world_size=2)  # rank 0's 7 samples: 1 padding copy
    assert not all(v for batch in loader.epoch(0) for v in batch.valid.tolist())

    expected = []
    with torch.no_grad():
        for batch in loader.epoch(0):
            pred_lab, pred_rgb = colorize_batch(model, batch.l)
            true_lab = torch.cat([batch.l, batch.ab], dim=1)
            true_rgb = np.stack([original_rgb(key) for key in batch.keys])
            for i in np.flatnonzero(batch.valid.numpy()):
                expected.append([*skimage_scores(pred_lab[i].double().numpy(), true_lab[i].double().numpy(), 2.0),
                                 *skimage_scores(pred_rgb[i].double().numpy(), true_rgb[i], 1.0)])
    assert len(expected) == 7
    metrics = compute_metrics(model, loader, device="cpu")
    ours = [metrics[name] for name in ("psnr_lab", "ssim_lab", "psnr_rgb", "ssim_rgb")]
    np.testing.assert_allclose(ours[:2], np.mean(expected, axis=0)[:2], rtol=1e-6)
    # The ground-truth RGB goes through Lab and back in float32: equal to the decoded PNG to ~1e-5.
    np.testing.assert_allclose(ours[2:], np.mean(expected, axis=0)[2:], rtol=1e-4)
    assert metrics["psnr_lab_gray"] > 0 and metrics["colorfulness_real"] > 0
    assert "fid" not in metrics


def original_rgb(key: str) -> np.ndarray:
    """The original RGB of sample `key` ("<shard>/<synth index>"), as float64 (3, H, W) in [0, 1]."""
    return synth_image(int(key.rsplit("/", 1)[-1]), RESOLUTION).transpose(2, 0, 1) / 255.0


def test_colorfulness_of_gray_and_pure_red():
    gray = torch.full((1, 3, 8, 8), 0.4)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    # Pure red: rg = 255, yb = 127.5 everywhere, so σ = 0 and M = 0.3 · √(255² + 127.5²).
    torch.testing.assert_close(colorfulness(torch.cat([gray, red])),
                               torch.tensor([0.0, 0.3 * np.hypot(255.0, 127.5)], dtype=torch.float64))


def test_frechet_distance_from_sums_equals_pytorch_fid():
    rng = np.random.default_rng(0)
    fake_features = rng.gamma(2.0, 0.3, size=(90, 64))
    real_features = rng.gamma(2.2, 0.3, size=(70, 64))
    fake, real = fid.empty_sums("cpu", dim=64), fid.empty_sums("cpu", dim=64)
    for chunk in np.array_split(fake_features, 4):  # as batches on several ranks would add them
        fid.accumulate(fake, torch.from_numpy(chunk))
    fid.accumulate(real, torch.from_numpy(real_features))
    ours = fid.frechet_distance(fid.gaussian_from_sums(fake), fid.gaussian_from_sums(real))
    expected = calculate_frechet_distance(fake_features.mean(0), np.cov(fake_features, rowvar=False),
                                          real_features.mean(0), np.cov(real_features, rowvar=False))
    assert ours == pytest.approx(expected, rel=1e-6)


def test_missing_fid_weights_name_the_file_and_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError, match=f"not found at {expected}.*download .*{fid.FID_WEIGHTS_FILENAME}"):
        fid.load_inception()
    with pytest.raises(FileNotFoundError, match=f"not found at {tmp_path / 'elsewhere.pth'}.*--fid-weights"):
        fid.load_inception(tmp_path / "elsewhere.pth")


def test_corrupt_fid_weights_give_one_clear_line(tmp_path: Path):
    broken = tmp_path / fid.FID_WEIGHTS_FILENAME
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"FID Inception weights at {broken} cannot be loaded"):
        fid.load_inception(broken)


def test_inception_loads_from_hub_cache_and_gives_2048_features(fid_weights: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(fid_weights.parents[2]))
    inception = fid.load_inception()
    state = torch.load(fid_weights, weights_only=True)
    torch.testing.assert_close(inception.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    features = fid.inception_features(inception, torch.rand(2, 3, 32, 32))
    assert features.shape == (2, fid.FEATURE_DIM) and features.dtype == torch.float64
