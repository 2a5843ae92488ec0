"""Shared by the training tests: a tiny model config, launching runs, reading weights back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "colorize_dist" / "train.py"
RANK_PROBE = Path(__file__).with_name("rank_probe.py")


def tiny_overrides(shards: Path, **extra: object) -> list[str]:
    """A model small enough for CPU tests; every test run uses the reference loader with one worker."""
    settings = {
        "data.shards": shards, "data.resolution": 16, "data.backend": "reference", "data.num_threads": 1,
        "data.shuffle_buffer": 16,
        "model.generator.ndims": 4, "model.generator.depth": 2, "model.discriminator.ndims": 4,
        "model.discriminator.n_layers": 1,
        "loss.beta": 0.0, "loss.theta": 0.2, "optim.lr": 1e-3, "train.mixed_precision": "fp32",
        "train.batch_size": 4, "train.max_steps": 20, "train.pretrain_steps": 4, "train.ema_decay": 0.9,
        "train.log_every": 2, "train.sample_every": 10, "train.validate_every": 10, "train.checkpoint_every": 5,
        "train.keep_checkpoints": 2, "train.num_samples": 2,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# How each accelerate config file is launched on a CPU machine (see the files' comments).
LAUNCH_FLAGS = {"cpu_2proc.yaml": ["--multi_gpu"], "deepspeed_cpu_2proc.yaml": []}
LAUNCH_ENV = {"cpu_2proc.yaml": {"ACCELERATE_USE_CPU": "1"}, "deepspeed_cpu_2proc.yaml": {}}


def launch(accelerate_config: str, run_dir: Path, overrides: list[str], *, timeout: float = 600,
           ) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<name> rank_probe.py RUN overrides...`."""
    return launch_script(accelerate_config, [str(RANK_PROBE), str(run_dir), *overrides], timeout=timeout)


def launch_command(accelerate_config: str, script_args: list[str], *launch_flags: str) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<name> [flags] script args...` as a command line."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "configs" / "accelerate" / accelerate_config),
            *LAUNCH_FLAGS[accelerate_config], "--main_process_port", str(free_port()), *launch_flags, *script_args]


def launch_script(accelerate_config: str, script_args: list[str], *launch_flags: str, timeout: float = 600,
                  ) -> subprocess.CompletedProcess:
    """Run `launch_command(...)` to the end; stdout and stderr are captured."""
    return subprocess.run(launch_command(accelerate_config, script_args, *launch_flags), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=subprocess_env() | LAUNCH_ENV[accelerate_config])


def train_process(run_dir: Path, overrides: list[str], *extra_args: str) -> subprocess.Popen:
    """`python colorize_dist/train.py --run-dir RUN ...` in its own process group (one rank + loader workers)."""
    return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *extra_args, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env(),
                            start_new_session=True)


def train_once(run_dir: Path, overrides: list[str], *extra_args: str, timeout: float = 600,
               ) -> subprocess.CompletedProcess:
    process = train_process(run_dir, overrides, *extra_args)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return env


def probe_weights(run_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    """What rank_probe.py wrote for `rank`: generator (g.), discriminator (d.) and EMA (ema.) tensors."""
    return load_file(run_dir / f"weights-rank{rank}.safetensors")


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], **tolerance) -> None:
    assert first.keys() == second.keys()
    assert {key.split(".")[0] for key in first} == {"g", "d", "ema"}
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=lambda m, key=key: f"{key}: {m}", **tolerance)


def checkpoint_names(run_dir: Path) -> set[str]:
    return {path.name for path in (run_dir / "checkpoints").iterdir()}
