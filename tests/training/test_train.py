"""The training loop end to end on CPU: config errors, checkpoints and resume, signals, NaN, DDP and DeepSpeed."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from colorize_dist import cli
from colorize_dist.commands import train as command
from colorize_dist.config import ConfigError, preset_names
from colorize_dist.training import checkpoint
from colorize_dist.training.config import TrainConfig, check_launch, load_training_config
from colorize_dist.training.stop import EXIT_RESUMABLE
from tests.training.helpers import (
    RANK_PROBE,
    assert_same_weights,
    checkpoint_names,
    launch,
    probe_weights,
    subprocess_env,
    tiny_overrides,
    train_once,
    train_process,
)

# ---------------------------------------------------------------- configuration errors (fast, in-process)

def train_cli(*argv: str) -> int:
    return cli.run("train", command.main, command.parse(list(argv)))


@pytest.mark.parametrize(("override", "message"), [
    ("train.batch_sise=8", "Key 'batch_sise' not in 'TrainConfig'"),
    ("train.batch_size=eight", "Value 'eight' of type 'str' could not be converted to Integer"),
    ("train.best_metric=accuracy", "train.best_metric='accuracy' is not one of psnr_lab"),
    ("train.best_metric=fid", "train.best_metric=fid needs train.fid_weights"),
    ("optim.schedule=exponential", "optim.schedule='exponential' is not one of constant, linear, cosine"),
    ("data.resolution=20", "resolution 20 does not fit generator.depth=3: it must be a multiple of 2^depth = 8"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not one of fp32, fp16, bf16"),
])
def test_bad_config_values_are_one_clear_line(override: str, message: str, capsys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_training_config(None, [override])
    assert train_cli("--run-dir", str(tmp_path), override) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_resolution_too_small_for_the_discriminator_is_refused_before_anything_starts(capsys,
                                                                                       tmp_path: Path) -> None:
    assert train_cli("--run-dir", str(tmp_path), "model.discriminator.n_layers=4") == 2
    assert capsys.readouterr().err == ("train: resolution 32 is too small for discriminator.n_layers=4 with "
                                       "num_scales=1: use at least 48, or fewer layers or scales\n")
    assert not (tmp_path / "config.yaml").exists()
    load_training_config("tiny", ["model.discriminator.n_layers=4", "loss.theta=0"])  # no discriminator: fine


def test_batch_must_split_over_processes_and_accumulation() -> None:
    assert check_launch(TrainConfig(batch_size=64, grad_accum=2), num_processes=8) == 4
    with pytest.raises(ConfigError, match=re.escape("train.batch_size=64 is not divisible by processes × "
                                                    "train.grad_accum = 3 × 1 = 3")):
        check_launch(TrainConfig(batch_size=64), num_processes=3)


def test_perceptual_loss_without_vgg_weights_fails_at_start(shards: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    started = time.perf_counter()
    assert train_cli("--run-dir", str(tmp_path / "run"), *tiny_overrides(shards, **{"loss.beta": 1.0})) == 2
    error = capsys.readouterr().err
    assert "vgg16-397923af.pth" in error and "set loss.beta=0" in error
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_presets_load_by_name() -> None:
    for name in preset_names():
        cfg = load_training_config(name)
        check_launch(cfg.train, 8 if name.startswith("res") else 1)
    seed000 = load_training_config("seed000")
    assert (seed000.train.epochs, seed000.train.batch_size) == (100, 64)
    assert (seed000.loss.alpha, seed000.loss.beta, seed000.loss.theta) == (100.0, 10.0, 0.2)
    assert (seed000.optim.lr, seed000.optim.betas) == (2e-4, [0.5, 0.999])


# ---------------------------------------------------------------- one process: checkpoints, resume, signals, NaN

def probe(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """rank_probe.py in one plain process (no launcher)."""
    return subprocess.run([sys.executable, str(RANK_PROBE), str(run_dir), *overrides], capture_output=True,
                          text=True, timeout=600, env=subprocess_env())


@pytest.mark.slow
def test_resume_continues_the_same_trajectory(shards: Path, tmp_path: Path) -> None:
    """20 steps in one run == 10 steps, stop, resume, 10 more; checkpoints pruned to the last 2 plus best."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert probe(straight, tiny_overrides(shards)).returncode == 0
    first_half = probe(resumed, tiny_overrides(shards, **{"train.max_steps": 10}))
    assert first_half.returncode == 0, first_half.stderr
    assert checkpoint_names(resumed) == {"step-0000005", "step-0000010", "best"}
    second_half = probe(resumed, tiny_overrides(shards))
    assert second_half.returncode == 0, second_half.stderr
    assert "resumed from" in second_half.stdout and "step-0000010" in second_half.stdout

    assert_same_weights(probe_weights(straight, 0), probe_weights(resumed, 0), rtol=1e-5, atol=1e-6)
    assert checkpoint_names(straight) == checkpoint_names(resumed) == {"step-0000015", "step-0000020", "best"}
    for run in (straight, resumed):
        assert {path.name for path in (run / "export").iterdir()} == {"generator_final.safetensors",
                                                                      "generator_best.safetensors"}
        assert sorted(path.name for path in (run / "samples").iterdir()) == ["step-0000010.png", "step-0000020.png"]
        manifest = checkpoint.read_manifest(run / "checkpoints" / "step-0000020")
        assert manifest["step"] == 20 and any(name.startswith("random_states_0") for name in manifest["files"])


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_resumes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shards, **{"train.max_steps": 100000, "train.checkpoint_every": 10000,
                                          "train.validate_every": 10000, "train.sample_every": 4,
                                          "data.num_threads": 2})
    process = train_process(run_dir, overrides)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "samples" / "step-0000004.png").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # the loop has taken 4 steps
        os.killpg(process.pid, signal.SIGTERM)  # as Slurm does: every process of the job, loader workers too
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == EXIT_RESUMABLE, stderr
    (saved,) = checkpoint_names(run_dir) - {"best"}
    stopped_at = int(saved.removeprefix("step-"))
    assert 0 < stopped_at < 100000 and checkpoint.check(run_dir / "checkpoints" / saved) is None
    assert f"checkpoint at step {stopped_at} saved" in stdout
    assert not (run_dir / "export" / "generator_final.safetensors").exists()

    finish = train_once(run_dir, [*overrides, f"train.max_steps={stopped_at + 3}"])
    assert finish.returncode == 0, finish.stderr
    assert f"at step {stopped_at}" in finish.stdout and f"done at step {stopped_at + 3}" in finish.stdout


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_the_previous(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train_once(run_dir, tiny_overrides(shards, **{"train.max_steps": 10})).returncode == 0
    latest = run_dir / "checkpoints" / "step-0000010"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))  # same size, different bytes
    assert "model.safetensors does not match its checksum" in checkpoint.check(latest)

    resumed = train_once(run_dir, tiny_overrides(shards, **{"train.max_steps": 12}))
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"skipping checkpoint .*step-0000010: model.safetensors does not match", resumed.stderr)
    assert "resumed from" in resumed.stdout and "step-0000005 at step 5" in resumed.stdout
    assert "done at step 12" in resumed.stdout


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(shards: Path, tmp_path: Path) -> None:
    """An absurd learning rate makes the losses NaN/inf after D's first update (G's loss already, scored by that D),
    so every step skips an update; the skips are read on logging steps (train.log_every 2), and the first one after
    3 skipped in a row stops the run: at step 4, all 4 skipped."""
    result = train_once(tmp_path / "run", tiny_overrides(shards, **{
        "optim.lr": 1e30, "train.max_nonfinite_steps": 3, "train.pretrain_steps": 0}))
    assert result.returncode == 1
    assert re.search(r"train: 4 steps in a row were skipped for a NaN/inf loss or gradient \(step 4, 4 in all\)",
                     result.stderr), result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- two processes: DDP and DeepSpeed ZeRO-2

def logged(run_dir: Path, tag: str) -> list[float]:
    """A scalar's values from the run's TensorBoard events, in step order."""
    (events_file,) = (run_dir / "logs" / "colorize").glob("events.out.tfevents.*")  # hparams have their own
    return [event.value for event in EventAccumulator(str(events_file)).Reload().Scalars(tag)]


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["cpu_2proc.yaml", "deepspeed_cpu_2proc.yaml"], ids=["ddp", "zero2"])
def test_two_processes_agree_and_resume_exactly(accelerate_config: str, shards: Path, tmp_path: Path) -> None:
    """Both ranks hold the same weights, with 2 micro-batches of 2 per process and step (accumulation)."""
    accumulate = {"train.batch_size": 8, "train.grad_accum": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = launch(accelerate_config, straight, tiny_overrides(shards, **accumulate))
    assert result.returncode == 0, result.stderr[-3000:]
    reconstruction = logged(straight, "loss/g_reconstruction")
    assert len(reconstruction) == 10 and all(map(math.isfinite, reconstruction))
    assert reconstruction[-1] < 0.8 * reconstruction[0]
    assert all(map(math.isfinite, logged(straight, "loss/d_total")))
    assert_same_weights(probe_weights(straight, 0), probe_weights(straight, 1), rtol=0, atol=0)

    for steps in (10, 20):
        result = launch(accelerate_config, resumed, tiny_overrides(shards, **accumulate, **{"train.max_steps": steps}))
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(probe_weights(resumed, 0), probe_weights(resumed, 1), rtol=0, atol=0)
    assert_same_weights(probe_weights(straight, 0), probe_weights(resumed, 0), rtol=1e-5, atol=1e-6)
    assert checkpoint_names(straight) == checkpoint_names(resumed) == {"step-0000015", "step-0000020", "best"}
    saved = json.loads((resumed / "checkpoints" / "step-0000020" / checkpoint.MANIFEST).read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(saved)
