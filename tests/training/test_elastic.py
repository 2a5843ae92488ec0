"""Resuming on another number of processes, or with another split of the global batch, or another batch.

A run saved by W processes and resumed by W' continues at the same sample of the same epoch with the same weights,
optimizer states, EMA and schedules: with the global batch fixed, every step is made of the same samples whatever the
number of processes (data.sharding), so the resumed weights equal those of one process that ran all the steps, within
the float noise of summing gradients in another order (fp32: the matrix of test_update measures 2e-7 after 4 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.helpers import (
    RANK_PROBE,
    assert_same_weights,
    launch_script,
    probe_weights,
    tiny_overrides,
    train_once,
)
from tests.training.test_train import probe

# Steps before the checkpoint, and in all: the resumed part ends with epoch 0 (65 samples, 9 steps of 8: the last one
# has 1 sample and 7 padding copies). Beyond it, two runs apart by fp32 noise part ways: the next step (a new epoch
# after a 1-sample step) turns 1e-7 into 1e-5 even between 1 process with grad_accum 1 and 2, as Adam amplifies
# differences where gradients nearly vanish (see test_update's TOLERANCE); the loader tests cover later epochs.
FIRST, TOTAL = 4, 9
TOLERANCE = {"rtol": 0.0, "atol": 1e-6}  # measured 1.3e-7 between one and two processes after 9 steps
# (name, accelerate config, extra launch flags): how a number of processes is launched for each backend.
BACKENDS = {"ddp": ("cpu_2proc.yaml", ()), "zero1": ("deepspeed_cpu_2proc.yaml", ("--zero_stage", "1")),
            "zero2": ("deepspeed_cpu_2proc.yaml", ())}


def overrides(shards: Path, steps: int, **extra: object) -> list[str]:
    return tiny_overrides(shards, **{"train.batch_size": 8, "train.max_steps": steps, "train.checkpoint_every": FIRST,
                                     "train.trackers": "[]", **extra})


def run(backend: str, processes: int, run_dir: Path, settings: list[str]):
    """The rank probe on `processes` processes of `backend` (one DDP process: a plain process)."""
    accelerate_config, flags = BACKENDS[backend]
    if backend == "ddp" and processes == 1:
        return probe(run_dir, settings)
    return launch_script(accelerate_config, [str(RANK_PROBE), str(run_dir), *settings], *flags,
                         "--num_processes", str(processes))


@pytest.fixture(scope="module")
def straight(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, all TOTAL steps: what every resumed cell must reach."""
    run_dir = tmp_path_factory.mktemp("straight")
    result = probe(run_dir, overrides(shards, TOTAL))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


CELLS = [(backend, before, after) for backend in BACKENDS for before, after in ((2, 1), (1, 2), (2, 4))]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "before", "after"), CELLS)
def test_a_run_resumed_on_another_number_of_processes_continues_the_same_trajectory(
        backend: str, before: int, after: int, shards: Path, straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(backend, before, run_dir, overrides(shards, FIRST))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run(backend, after, run_dir, overrides(shards, TOTAL))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-0000004'} at step 4 (epoch 0, sample 32" in resumed.stdout
    assert f"was saved by {before} processes, this run has {after}" in resumed.stdout
    if backend != "ddp":
        assert "to the universal format" in resumed.stdout  # ZeRO's partitioned optimizer states, converted
    reference = probe_weights(straight, 0)
    for rank in range(after):
        assert_same_weights(reference, probe_weights(run_dir, rank), **TOLERANCE)
    resumed_weights = probe_weights(run_dir, 0)
    largest = max((reference[key] - resumed_weights[key]).abs().max().item() for key in reference)
    print(f"{backend} {before} → {after} processes: largest weight difference to one process {largest:.2g}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["images_seen"] == json.loads((straight / "summary.json").read_text())["images_seen"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the converted copy is gone


@pytest.mark.slow
def test_another_split_of_the_global_batch_continues_at_the_same_sample(shards: Path, straight: Path,
                                                                        tmp_path: Path) -> None:
    """grad_accum 1 → 4 with the batch of 8: the same samples per step, so the same weights."""
    run_dir = tmp_path / "run"
    assert train_once(run_dir, overrides(shards, FIRST)).returncode == 0
    resumed = probe(run_dir, overrides(shards, TOTAL, **{"train.grad_accum": 4}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4 (epoch 0, sample 32 of 65)" in resumed.stdout
    assert_same_weights(probe_weights(straight, 0), probe_weights(run_dir, 0), **TOLERANCE)


@pytest.mark.slow
def test_another_global_batch_is_refused_unless_allowed_then_continues_at_the_same_sample(shards: Path,
                                                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train_once(run_dir, overrides(shards, FIRST)).returncode == 0  # 4 steps of 8: sample 32 of epoch 0
    saved = {path.name for path in (run_dir / "checkpoints").iterdir()}
    refused = train_once(run_dir, overrides(shards, TOTAL, **{"train.batch_size": 16}))
    assert refused.returncode == 2
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("train: ")]
    assert "train.batch_size=8" in line and "16" in line and "train.allow_batch_change=true" in line
    assert "Traceback" not in refused.stderr
    assert {path.name for path in (run_dir / "checkpoints").iterdir()} == saved  # nothing written

    allowed = train_once(run_dir, overrides(shards, 7, **{"train.batch_size": 16, "train.allow_batch_change": True}))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "the global batch changes from 8 to 16" in allowed.stdout
    # Steps 5-7 read samples 32-47, 48-63 and 64 of epoch 0 (33 left: 16, 16, then 1): every sample once.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["step"], summary["images_seen"]) == (7, 65)
