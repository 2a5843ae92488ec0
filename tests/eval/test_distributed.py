"""Metrics over 2 processes (gloo) equal those of 1 process on the same, unevenly split, data: the means, each
image's values and ITA gathered to rank 0, and the card's intervals and strata made from them."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.eval.card import Strata, summarise
from colorize_dist.eval.metrics import Evaluation, compute_metrics, evaluate
from colorize_dist.eval.names import INCEPTION_METRICS
from colorize_dist.models.export import load_generator
from tests.eval.conftest import RESOLUTION

BATCH_SIZE = 4


def val_metrics(shards: Path, generator_file: Path, rank: int = 0, world_size: int = 1,
                **weights) -> dict[str, float]:
    model, _, _ = load_generator(generator_file)
    cfg = DataConfig(shards=str(shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    loader = build_loader(cfg, "val", batch_size=BATCH_SIZE, rank=rank, world_size=world_size)
    return compute_metrics(model, loader, device="cpu", **weights)


def val_evaluation(shards: Path, generator_file: Path, rank: int = 0, world_size: int = 1, **weights) -> Evaluation:
    model, _, _ = load_generator(generator_file)
    cfg = DataConfig(shards=str(shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    loader = build_loader(cfg, "val", batch_size=BATCH_SIZE, rank=rank, world_size=world_size)
    return evaluate(model, loader, device="cpu", **weights)


def _rank_evaluation(rank: int, world_size: int, port: int, args: tuple, weights: dict, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results.put((rank, val_evaluation(*args, rank=rank, world_size=world_size, **weights)))
    finally:
        dist.destroy_process_group()


def two_process_evaluation(shards: Path, generator_file: Path, **weights) -> Evaluation:
    """Rank 0's evaluation by 2 gloo processes; asserts both ranks have the same metrics and only rank 0 the
    per-image values."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_evaluation, args=(2, port, (shards, generator_file), weights, results), nprocs=2,
                       start_method="spawn")
    by_rank = dict(results.get() for _ in range(2))
    assert by_rank[0].metrics == by_rank[1].metrics and by_rank[0].fid_se == by_rank[1].fid_se
    assert by_rank[1].per_image is None and by_rank[1].ita is None and by_rank[1].baselines is None  # rank 0 only
    return by_rank[0]


def two_process_metrics(shards: Path, generator_file: Path, **weights) -> dict[str, float]:
    return two_process_evaluation(shards, generator_file, **weights).metrics


def assert_metrics_close(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Sums and gathers are exact, but float32 Inception inference varies with batch size and threads (1 rank:
    batches of 4+4+4+3 images, 2 ranks: 4+3 and 4+4, one thread each), which the random test network's
    logits amplify: IS and its spread then differ by ~1e-5. Gathering the ranks in the wrong order changes
    IS's splits, here IS by 1.4e-3 and its spread by 2e-2."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-4 if name in INCEPTION_METRICS else 1e-6), name


def test_two_processes_equal_one_on_an_uneven_split(val_shards: Path, generator_file: Path, lpips_weights: Path):
    single = val_evaluation(val_shards, generator_file, lpips_weights=lpips_weights)
    assert {"psnr_ab", "ssim_ab", "delta_e", "lpips"} <= single.metrics.keys()
    double = two_process_evaluation(val_shards, generator_file, lpips_weights=lpips_weights)
    assert_metrics_close(double.metrics, single.metrics)
    # Each image's values arrive in the split's order (15 images: 7 from rank 0, then 8 from rank 1).
    assert list(double.per_image) == list(single.per_image) == list(single.metrics)
    for name, values in single.per_image.items():
        assert values.shape == (15,) and values.mean() == pytest.approx(single.metrics[name], rel=1e-12)
        # float32 inference differs with the batch's composition (see assert_metrics_close); SSIM ab is near 0
        np.testing.assert_allclose(double.per_image[name], values, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(double.ita, single.ita)  # from the ground truth alone: exact
    for name in ("pixels", "fraction"):
        np.testing.assert_array_equal(double.skin[name], single.skin[name])
    assert np.isfinite(single.ita).any()
    assert list(double.baselines) == list(single.baselines) == ["gray"]
    for name, values in single.baselines["gray"].items():  # the gray baseline's values, as the model's
        np.testing.assert_allclose(double.baselines["gray"][name], values, rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(single.baselines["gray"]["psnr_lab"], single.per_image["psnr_lab_gray"], rtol=1e-12)
    one = summarise(single.per_image, Strata.from_ita(single.ita), 2, single.baselines)
    two = summarise(double.per_image, Strata.from_ita(double.ita), 2, double.baselines)
    for name, entry in one["versus_baselines"]["gray"].items():
        assert two["versus_baselines"]["gray"][name] == pytest.approx(entry, rel=1e-6, abs=1e-7), name
    assert [entry["images"] for entry in two["strata"]] == [entry["images"] for entry in one["strata"]]
    pairs = [(two["metrics"], one["metrics"]),
             *((a["metrics"], b["metrics"]) for a, b in zip(two["strata"], one["strata"], strict=True))]
    for figures, expected in pairs:
        for name, entry in expected.items():
            assert figures[name] == pytest.approx(entry, rel=1e-6, abs=1e-7), name


@pytest.mark.slow
def test_fid_kid_is_over_two_processes_with_and_without_cached_reference(val_shards: Path, generator_file: Path,
                                                                         fid_weights: Path, tmp_path: Path):
    """2 ranks (7 + 8 images) gather the ground truth's Inception features, write the reference; 1 rank reuses it."""
    single = val_metrics(val_shards, generator_file, fid_weights=fid_weights)
    assert single["fid"] > 0 and single["inception_score"] >= 1 and single["kid_std"] >= 0
    reference = tmp_path / "val_reference.npz"
    assert_metrics_close(two_process_metrics(val_shards, generator_file, fid_weights=fid_weights,
                                             fid_reference=reference), single)
    assert reference.is_file()
    assert_metrics_close(val_metrics(val_shards, generator_file, fid_weights=fid_weights, fid_reference=reference),
                         single)
