"""Damaged shards end a training or evaluation run within a bounded time, with exit status 2 and exactly one line
naming the shard and the fix, on every rank, with both loaders; the last checkpoint stays intact.

Before: with the reference loader these runs hung (still running after 300 s: the DataLoader workers ignore SIGTERM
and multiprocessing waited for them at exit); with DALI they ended in a C++ assertion traceback, or (a damaged tar
header) trained on silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.models.config import GeneratorConfig
from colorize_dist.models.export import save_generator
from colorize_dist.models.generator import build_generator
from colorize_dist.training import checkpoint
from tests.data.helpers import (
    damaged_copy,
    flip_header,
    flip_payload,
    flip_sample,
    misstate_size,
    needs_dali,
    remove_index,
    stale_index,
    truncate,
)
from tests.training.helpers import REPO, TRAIN_SCRIPT, free_port, subprocess_env, tiny_overrides, train_once

BOUND_S = 120  # a faulty run, start to exit (a tiny run takes 10-20 s here; the hang this replaces never ended)
BACKENDS = [pytest.param("dali", marks=needs_dali), "reference"]

# (fault, shard): read-time faults in a train shard (caught by the checksum and tar header checks on the sample
# read), and truncated shards, a missing index, a manifest that misstates a size (caught before the first step).
FAULTS = {
    "flipped payload": (flip_payload, "train/train-000001.tar"),
    "flipped tar header": (flip_header, "train/train-000001.tar"),
    "truncated train shard": (truncate, "train/train-000001.tar"),
    "truncated val shard": (truncate, "val/val-000000.tar"),
    "missing index": (remove_index, "train/train-000000.tar"),
    "manifest mismatch": (misstate_size, "val/val-000000.tar"),
    "stale index": (stale_index, "train/train-000001.tar"),  # the tar intact: the fix is `index --repair`
}
REPAIRED = ("missing index", "stale index")


def one_line(stderr: str, prefix: str) -> str:
    """The command's own error line: exactly one, and no traceback anywhere."""
    lines = [line for line in stderr.splitlines()
             if line.startswith(f"{prefix}: ") and not re.match(r"\S+: +\d+%\|", line)]  # not a progress bar
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def batches_per_epoch(shards: Path, batch_size: int) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return -(-manifest["splits"]["train"]["samples"] // batch_size)


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request, shards: Path, tmp_path_factory) -> tuple[str, Path, Path, int]:
    """(backend, pristine shards, a run dir with a checkpoint at the end of epoch 0, batches per epoch)."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"trained-{backend}")
    pristine = root / "shards"
    shutil.copytree(shards, pristine)
    epoch = batches_per_epoch(pristine, 4)
    run_dir = root / "run"
    result = train_once(run_dir, tiny_overrides(pristine, **{"data.backend": backend, "train.max_steps": epoch,
                                                             "train.checkpoint_every": epoch}))
    assert result.returncode == 0, result.stderr
    assert f"data: {'DALI' if backend == 'dali' else 'reference loader'}" in result.stdout
    return backend, pristine, run_dir, epoch


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_shard_ends_training_in_one_line(trained, fault: str, tmp_path: Path) -> None:
    backend, pristine, trained_run, epoch = trained
    damage, shard = FAULTS[fault]
    shards, damaged = damaged_copy(pristine, tmp_path / "shards", damage, shard)
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    last = checkpoint.latest_valid(run_dir / checkpoint.CHECKPOINTS)
    assert last is not None and last.name == checkpoint.step_name(epoch)

    started = time.perf_counter()  # the resumed run reads every sample of epoch 1, saving no checkpoint meanwhile
    result = train_once(run_dir, tiny_overrides(shards, **{"data.backend": backend, "train.max_steps": 3 * epoch,
                                                           "train.checkpoint_every": 1000,
                                                           "train.validate_every": 1000}), timeout=BOUND_S)
    seconds = time.perf_counter() - started
    assert result.returncode == 2 and seconds < BOUND_S, result.stderr
    line = one_line(result.stderr, "train")
    fix = f"shards index {shards} --repair" if fault in REPAIRED else "colorize-dist shards verify"
    assert str(damaged) in line and fix in line
    assert checkpoint.latest_valid(run_dir / checkpoint.CHECKPOINTS) == last  # intact, and still the newest
    assert not list((run_dir / checkpoint.CHECKPOINTS).glob(".tmp-*"))


@pytest.mark.slow
def test_a_sample_only_rank_1_reads_ends_both_ranks_in_one_line(shards: Path, tmp_path: Path) -> None:
    """Two processes (gloo): rank 1 finds the damaged sample of its first micro-batch; rank 0, which never reads it,
    waiting for rank 1 in a collective, ends too."""
    overrides = tiny_overrides(shards, **{"train.batch_size": 8, "train.max_steps": 40})
    settings = dict(item.split("=", 1) for item in overrides)
    cfg = DataConfig(shards=str(shards), resolution=16, backend="reference", shuffle_buffer=int(
        settings["data.shuffle_buffer"]))
    with build_loader(cfg, "train", batch_size=4, global_batch=8, rank=1, world_size=2, seed=0) as loader:
        first = next(loader.epoch(0))
    shard_name, key = first.keys[0].split("/", 1)
    with build_loader(cfg, "train", batch_size=4, global_batch=8, rank=0, world_size=2, seed=0) as loader:
        assert all(first.keys[0] not in batch.keys for batch in loader.epoch(0))  # rank 0 never reads it
    damaged_shards, damaged = damaged_copy(shards, tmp_path / "shards", flip_sample, f"train/{shard_name}.tar",
                                           key=key)
    run_dir = tmp_path / "run"
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                              "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    overrides = [item.replace(str(shards), str(damaged_shards)) for item in overrides]
    started = time.perf_counter()
    ranks = [subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True)
             for rank in range(2)]
    try:
        outputs = [rank.communicate(timeout=BOUND_S) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, 9)
    assert time.perf_counter() - started < BOUND_S
    for rank, (_, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 2, stderr
        line = one_line(stderr, "train")
        assert str(damaged) in line and "colorize-dist shards verify" in line


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["flipped payload", "stale index"])
def test_eval_on_a_damaged_shard_ends_in_one_line(backend: str, fault: str, shards: Path, tmp_path: Path) -> None:
    generator_cfg = GeneratorConfig(ndims=4, depth=2)
    weights = tmp_path / "generator.safetensors"
    save_generator(build_generator(generator_cfg), generator_cfg, 16, weights)
    damaged_shards, damaged = damaged_copy(shards, tmp_path / "shards", FAULTS[fault][0], "val/val-000000.tar")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "colorize_dist", "eval", "--checkpoint", str(weights),
                             "--shards", str(damaged_shards), "--backend", backend, "--batch-size", "4",
                             "--out", str(tmp_path / "eval"), "--cpu"],
                            capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=BOUND_S)
    assert result.returncode == 2 and time.perf_counter() - started < BOUND_S, result.stderr
    line = one_line(result.stderr, "eval")
    fix = f"shards index {damaged_shards} --repair" if fault in REPAIRED else "colorize-dist shards verify"
    assert str(damaged) in line and fix in line
    assert not (tmp_path / "eval" / "metrics.json").exists()
