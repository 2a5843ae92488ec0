"""Metric definitions against their reference implementations (skimage, pytorch-fid, torch-fidelity, torchmetrics,
PIL), and the loading of Inception and AlexNet weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import InceptionV3
from skimage.color import deltaE_ciede2000
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

from colorize_dist.data import DataConfig, build_loader, synth_image
from colorize_dist.eval import INCEPTION_METRICS, LPIPS_METRICS, PER_IMAGE_METRICS, fid
from colorize_dist.eval.lpips import LPIPS_WEIGHTS_FILENAME, load_lpips, lpips_scores
from colorize_dist.eval.metrics import (
    ciede2000,
    colorfulness,
    colorize_batch,
    compute_metrics,
    denormalise_lab,
    psnr,
    ssim,
)
from colorize_dist.models.export import load_generator
from colorize_dist.models.spaces import to_rgb
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


def test_ciede2000_matches_skimage_and_sharmas_table():
    rng = np.random.default_rng(0)
    lab1 = np.stack([rng.uniform(0, 100, (4, 16, 16)), *rng.uniform(-110, 110, (2, 4, 16, 16))], axis=1)
    lab2 = lab1 + rng.normal(0.0, 8.0, lab1.shape)
    lab1[:, 1:, 0], lab2[:, 1:, 1] = 0.0, 0.0  # achromatic pixels: hue 0, no hue difference
    lab2[:, 1, 2], lab1[:, 1, 2], lab1[:, 2, 2] = -50.0, -50.0, 3.0  # hues either side of 180°
    lab2[:, 2, 2] = -3.0
    expected = deltaE_ciede2000(lab1.transpose(0, 2, 3, 1), lab2.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(ciede2000(torch.from_numpy(lab1), torch.from_numpy(lab2)).numpy(), expected,
                               rtol=1e-12, atol=1e-12)
    # Sharma, Wu & Dalal (2005), table 1, pairs 1, 7, 17 and 25 (four decimals).
    pairs = [((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425), ((50, 0, 0), (50, -1, 2), 2.3669),
             ((50, 2.5, 0), (73, 25, -18), 27.1492),
             ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644)]
    first, second = (torch.tensor([pair[i] for pair in pairs], dtype=torch.float64)[..., None, None] for i in (0, 1))
    np.testing.assert_allclose(ciede2000(first, second).flatten().numpy(), [pair[2] for pair in pairs], atol=5e-5)


def test_compute_metrics_lab_ab_delta_e_and_rgb_match_skimage(val_shards: Path, generator_file: Path):
    """The dataset means equal skimage's scores averaged over the real (not padding) samples."""
    model, _, _ = load_generator(generator_file)
    cfg = DataConfig(shards=str(val_shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    loader = build_loader(cfg, "val", batch_size=4, rank=1, world_size=2)  # rank 1's 7 samples: 1 padding copy
    assert not all(v for batch in loader.epoch(0) for v in batch.valid.tolist())

    expected = []
    with torch.no_grad():
        for batch in loader.epoch(0):
            pred_lab, pred_rgb = colorize_batch(model, batch.l)
            true_lab = torch.cat([batch.l, batch.ab], dim=1)
            pred_cielab, true_cielab = denormalise_lab(pred_lab).numpy(), denormalise_lab(true_lab).numpy()
            true_rgb = np.stack([original_rgb(key) for key in batch.keys])
            for i in np.flatnonzero(batch.valid.numpy()):
                pred, true = pred_lab[i].double().numpy(), true_lab[i].double().numpy()
                delta_e = deltaE_ciede2000(pred_cielab[i], true_cielab[i], channel_axis=0).mean()
                expected.append([*skimage_scores(pred, true, 2.0), *skimage_scores(pred[1:], true[1:], 2.0), delta_e,
                                 *skimage_scores(pred_rgb[i].double().numpy(), true_rgb[i], 1.0)])
    assert len(expected) == 7
    metrics = compute_metrics(model, loader, device="cpu")
    names = ("psnr_lab", "ssim_lab", "psnr_ab", "ssim_ab", "delta_e", "psnr_rgb", "ssim_rgb")
    ours, reference = np.array([metrics[name] for name in names]), np.mean(expected, axis=0)
    np.testing.assert_allclose(ours[:5], reference[:5], rtol=1e-6)
    # The ground-truth RGB goes through Lab and back in float32: equal to the decoded PNG to ~1e-5.
    np.testing.assert_allclose(ours[5:], reference[5:], rtol=1e-4)
    assert metrics["psnr_ab"] < metrics["psnr_lab"]  # the copied L no longer flatters the colour
    assert metrics["psnr_lab_gray"] > 0 and metrics["colorfulness_real"] > 0 and metrics["delta_e"] > 0
    assert "fid" not in metrics and "lpips" not in metrics


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


def test_fid_standard_error_is_the_delete_a_group_jackknife_of_pytorch_fids_fid():
    """The SE equals the jackknife over the same groups of pytorch-fid's FID of the features, with the prediction
    and the ground truth of an image left out together, from the sums or from a reference's (μ, Σ)."""
    rng = np.random.default_rng(0)
    fake_features, real_features = rng.gamma(2.0, 0.3, size=(120, 32)), rng.gamma(2.2, 0.3, size=(120, 32))
    fake, real = fid.empty_sums("cpu", dim=32), fid.empty_sums("cpu", dim=32)
    fid.accumulate(fake, torch.from_numpy(fake_features))
    fid.accumulate(real, torch.from_numpy(real_features))

    replicates = []
    for part in np.array_split(np.random.RandomState(fid.SEED).permutation(120), fid.JACKKNIFE_GROUPS):
        kept = np.setdiff1d(np.arange(120), part)
        x, y = fake_features[kept], real_features[kept]
        replicates.append(calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                                     np.cov(y, rowvar=False)))
    expected = np.sqrt((fid.JACKKNIFE_GROUPS - 1) / fid.JACKKNIFE_GROUPS
                       * ((np.array(replicates) - np.mean(replicates)) ** 2).sum())
    ours = fid.frechet_standard_error(fake, real, torch.from_numpy(fake_features), torch.from_numpy(real_features))
    assert ours == pytest.approx(expected, rel=1e-7) and ours > 0
    from_reference = fid.sums_from_gaussian(*fid.gaussian_from_sums(real), 120)  # a cached reference's (μ, Σ)
    assert fid.frechet_standard_error(fake, from_reference, torch.from_numpy(fake_features),
                                      torch.from_numpy(real_features)) == pytest.approx(expected, rel=1e-7)


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
    torch.testing.assert_close(inception.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    features = fid.inception_features(inception, torch.rand(2, 3, 32, 32))
    assert features.shape == (2, fid.FEATURE_DIM) and features.dtype == torch.float64


def test_inception_features_are_computed_in_full_fp32(fid_weights: Path):
    """Without TF32 (cuDNN's default for convolutions) or autocast, whatever the run set: a GPU's features then
    equal the CPU's reference statistics up to the order of sums; TF32 would round every convolution's inputs to
    10 bits of mantissa. The flags are the run's again afterwards."""
    inception = fid.load_inception(fid_weights)
    seen = []
    hook = inception.register_forward_pre_hook(lambda module, args: seen.append((
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
        torch.is_autocast_enabled("cpu"))))
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "tf32"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pool, logits = fid.inception_outputs(inception, torch.rand(1, 3, 16, 16))
        assert [backend.fp32_precision for backend in backends] == ["tf32", "tf32"]
    finally:
        hook.remove()  # the loaded network is cached
        for backend, precision in zip(backends, before, strict=True):
            backend.fp32_precision = precision
    assert seen == [("ieee", "ieee", False)]
    assert pool.dtype == logits.dtype == torch.float32


def test_kid_matches_torch_fidelity():
    rng = np.random.default_rng(0)
    fake = torch.from_numpy(rng.gamma(2.0, 0.3, size=(1100, 64)))
    real = torch.from_numpy(rng.gamma(2.1, 0.3, size=(1050, 64)))
    expected = kid_features_to_metric(fake, real, kid_subsets=5, kid_subset_size=1000, rng_seed=2020, verbose=False)
    ours = fid.kernel_inception_distance(fake, real, subsets=5)
    np.testing.assert_allclose(ours, [expected["kernel_inception_distance_mean"],
                                      expected["kernel_inception_distance_std"]], rtol=1e-9)
    # Below 1000 images every subset is the whole set (torch-fidelity refuses; we take min(1000, n)).
    small = fid.kernel_inception_distance(fake[:40], real[:30], subsets=3)
    expected = kid_features_to_metric(fake[:40], real[:30], kid_subsets=3, kid_subset_size=30, verbose=False)
    assert small[0] == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-9)


def test_inception_score_matches_torch_fidelity():
    logits = torch.from_numpy(np.random.default_rng(0).normal(0.0, 3.0, size=(503, fid.LOGITS_DIM)))
    expected = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    np.testing.assert_allclose(fid.inception_score(logits), [expected["inception_score_mean"],
                                                             expected["inception_score_std"]], rtol=1e-12)


@pytest.mark.parametrize("side", [32, 512])  # up and down (antialiased) to 299
def test_inception_resize_is_pil_bicubic(side: int):
    """clean-fid's filter: PIL's bicubic resize of each channel as a float image, clamped to [0, 255]."""
    image = np.random.default_rng(side).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    expected = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((299, 299),
                                                                                             Image.BICUBIC))
                         for c in range(3)]).clip(0, 255)
    ours = fid.resize_for_inception(torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0)[0].double() * 255.0
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-3)  # float32 output; PIL computes in float32


def test_inception_equals_pytorch_fids_loaded_through_its_own_code(fid_weights: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Our one pass gives pytorch-fid's 2048-d features and, from the same pool, the logits pool · Wᵀ."""
    monkeypatch.setenv("TORCH_HOME", str(fid_weights.parents[2]))
    reference = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[fid.FEATURE_DIM]], resize_input=False).eval()
    images = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    pool, logits = fid.load_inception()(images)
    with torch.no_grad():
        expected = reference(images)[0].flatten(1)
    torch.testing.assert_close(pool, expected, rtol=1e-5, atol=1e-6)
    state = torch.load(fid_weights, weights_only=True)
    torch.testing.assert_close(logits, expected @ state["fc.weight"].T, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, fid.LOGITS_DIM)


def test_lpips_matches_torchmetrics_loaded_through_torchvision(lpips_weights: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(lpips_weights.parents[2]))
    generator = torch.Generator().manual_seed(0)
    true = torch.rand(3, 3, 48, 40, generator=generator)
    pred = (true + 0.1 * torch.randn(true.shape, generator=generator)).clamp(0, 1)
    reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
    reference.update(pred, true)
    ours = lpips_scores(load_lpips(), pred, true)
    assert ours.dtype == torch.float64 and ours.shape == (3,)
    torch.testing.assert_close(ours, reference.compute().double(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="at least 31×31 pixels, got 16×16"):
        lpips_scores(load_lpips(), pred[..., :16, :16], true[..., :16, :16])


def test_missing_lpips_weights_name_the_file_and_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / LPIPS_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError, match=f"not found at {expected}.*download .*{LPIPS_WEIGHTS_FILENAME}"):
        load_lpips()


@pytest.mark.slow  # Inception on CPU and two 2048² matrix square roots: about 40 s
def test_one_pass_fid_kid_is_and_lpips_match_references(val_shards: Path, generator_file: Path, fid_weights: Path,
                                                        lpips_weights: Path, monkeypatch: pytest.MonkeyPatch):
    """compute_metrics' set-level values equal pytorch-fid's, torch-fidelity's and torchmetrics' on the same images."""
    model, _, _ = load_generator(generator_file)
    cfg = DataConfig(shards=str(val_shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    loader = build_loader(cfg, "val", batch_size=4)
    metrics = compute_metrics(model, loader, device="cpu", fid_weights=fid_weights, lpips_weights=lpips_weights)

    # The same batches as compute_metrics: float32 inference differs with the batch's composition (~1e-6).
    inception, preds, truths, outputs = fid.load_inception(fid_weights), [], [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            keep = batch.valid
            preds.append(colorize_batch(model, batch.l[keep])[1])
            truths.append(to_rgb(batch.l[keep], batch.ab[keep], "ab"))
            outputs.append([*fid.inception_outputs(inception, preds[-1]),
                            fid.inception_outputs(inception, truths[-1])[0]])
    pred, true = torch.cat(preds), torch.cat(truths)
    fake, logits, real = (torch.cat(column).double() for column in zip(*outputs, strict=True))
    assert len(pred) == 15
    expected_fid = calculate_frechet_distance(fake.mean(0).numpy(), np.cov(fake.numpy(), rowvar=False),
                                              real.mean(0).numpy(), np.cov(real.numpy(), rowvar=False))
    kid = kid_features_to_metric(fake, real, kid_subsets=100, kid_subset_size=15, verbose=False)
    score = isc_features_to_metric(logits, splits=10)
    monkeypatch.setenv("TORCH_HOME", str(lpips_weights.parents[2]))
    lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True)
    lpips.update(pred, true)

    assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert metrics["kid"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    assert metrics["kid_std"] == pytest.approx(kid["kernel_inception_distance_std"], abs=1e-12)  # 15 images: ~0
    assert metrics["inception_score"] == pytest.approx(score["inception_score_mean"], rel=1e-9)
    assert metrics["inception_score_std"] == pytest.approx(score["inception_score_std"], rel=1e-9)
    assert metrics["fid"] > 1 and metrics["kid"] > 0 and metrics["inception_score"] > 1
    assert metrics["lpips"] == pytest.approx(lpips.compute().item(), rel=1e-6)
    assert list(metrics) == [*PER_IMAGE_METRICS, *LPIPS_METRICS, *INCEPTION_METRICS]
