"""Metrics over 2 processes (gloo) equal those of 1 process on the same, unevenly split, data."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.eval.metrics import compute_metrics
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


def _rank_metrics(rank: int, world_size: int, port: int, args: tuple, weights: dict, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results.put((rank, val_metrics(*args, rank=rank, world_size=world_size, **weights)))
    finally:
        dist.destroy_process_group()


def two_process_metrics(shards: Path, generator_file: Path, **weights) -> dict[str, float]:
    """Metrics computed by 2 gloo processes; asserts both ranks return the same dict."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_metrics, args=(2, port, (shards, generator_file), weights, results), nprocs=2,
                       start_method="spawn")
    by_rank = dict(results.get() for _ in range(2))
    assert by_rank[0] == by_rank[1]
    return by_rank[0]


def assert_metrics_close(actual: dict[str, float], expected: dict[str, float]) -> None:
    """Sums and gathers are exact, but float32 Inception inference varies with batch size and threads (1 rank:
    batches of 4+4+4+3 images, 2 ranks: 4+3 and 4+4, one thread each), which the random test network's
    logits amplify: IS and its spread then differ by ~1e-5. Gathering the ranks in the wrong order changes
    IS's splits, here IS by 1.4e-3 and its spread by 2e-2."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-4 if name in INCEPTION_METRICS else 1e-6), name


def test_two_processes_equal_one_on_an_uneven_split(val_shards: Path, generator_file: Path, lpips_weights: Path):
    single = val_metrics(val_shards, generator_file, lpips_weights=lpips_weights)
    assert {"psnr_ab", "ssim_ab", "delta_e", "lpips"} <= single.keys()
    assert_metrics_close(two_process_metrics(val_shards, generator_file, lpips_weights=lpips_weights), single)


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
