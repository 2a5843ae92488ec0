"""Training throughput of the precision and memory-format variants, each a real training run in its own process.

A process per variant gives each a fresh Accelerate state and compile cache; rates are the median of the loop's
logged rates after the warm-up steps, which hold compilation.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from colorize_dist.bench.names import VARIANTS
from colorize_dist.data.options import ShardOptions
from colorize_dist.data.synth import write_synthetic_shards
from colorize_dist.errors import UserError
from colorize_dist.training import costs
from colorize_dist.training.config import Config, load_training_config
from colorize_dist.training.summary import read_summary

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
DEFAULT_CONFIG = TRAIN_SCRIPT.parents[1] / "configs" / "tiny.yaml"


class VariantError(UserError, RuntimeError):
    """A variant's training run failed or ran out of time; the message holds the end of its stderr."""

    exit_status = 1


@dataclass(frozen=True)
class VariantResult:
    name: str
    batch_size: int
    steps_per_s: float  # medians of the loop's logged intervals after the warm-up steps
    images_per_s: float
    data_wait: float  # share of the time spent waiting for the loader
    peak_memory_mib: float | None  # the run's summary.json (CUDA: device-wide, see training/summary.py); None: none
    memory: str | None  # what peak_memory_mib measures


def run_variant(name: str, run_dir: Path, *, config: str | Path | None = None, shards: str | Path,
                overrides: Sequence[str] = (), steps: int = 40, warmup: int = 10,
                timeout: float | None = None) -> VariantResult:
    """One training run of `config` (a preset name or YAML file; default the tiny preset) with the variant's
    settings (a VARIANTS key) on `shards`, in its own process; rates from its TensorBoard log.

    Raises VariantError when the run fails or takes longer than `timeout` seconds.
    """
    log_every = max(1, (steps - warmup) // 10)
    run_overrides = [*overrides, f"data.shards={shards}", *VARIANTS[name], f"train.max_steps={steps}",
                     "train.pretrain_steps=0", f"train.log_every={log_every}", "train.trackers=[tensorboard]",
                     *(f"train.{key}={10**9}" for key in ("validate_every", "sample_every", "checkpoint_every"))]
    config_args = ["--config", str(config)] if config is not None else []
    try:
        process = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--run-dir", str(run_dir), "--resume", "none",
                                  *config_args, *run_overrides], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VariantError(f"the {name} run took longer than {timeout:.0f} s") from None
    if process.returncode != 0:
        raise VariantError(f"the {name} run failed (exit status {process.returncode}):\n{process.stderr[-3000:]}")
    images_per_s, data_wait = logged_rates(run_dir, warmup)
    cfg = load_training_config(run_dir / "config.yaml")
    summary = read_summary(run_dir) or {}
    return VariantResult(name=name, batch_size=cfg.train.batch_size, steps_per_s=images_per_s / cfg.train.batch_size,
                         images_per_s=images_per_s, data_wait=data_wait,
                         peak_memory_mib=summary.get("peak_memory_mib"), memory=summary.get("memory"))


def make_synthetic_shards(out: Path, cfg: Config) -> Path:
    return write_synthetic_shards(out, cfg.train.synth_images, cfg.data.resolution,
                                  options=ShardOptions(image_format="png", workers=1))


def logged_rates(run_dir: Path, warmup: int) -> tuple[float, float]:
    """Median images/s and data-wait share of the intervals the training loop logged after `warmup` steps."""
    (events_file,) = (run_dir / "logs" / "colorize").glob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file)).Reload()
    rates = [event for event in events.Scalars("images_per_s") if event.step > warmup]
    waits = [event for event in events.Scalars("data_wait") if event.step > warmup]
    return statistics.median(e.value for e in rates), statistics.median(e.value for e in waits)


def mfu(cfg: Config, images_per_s: float, variant: str, peak_tflops: float | None = None) -> float | None:
    """Model FLOPs utilisation of one process running `variant` (training/costs.py: FLOPs per image; against
    `peak_tflops` if given, else the GPU's data-sheet peak at the variant's precision); None off a GPU whose peak
    we know."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return costs.mfu(images_per_s, costs.point_cost(cfg).flops_per_image, 1, device,
                     "no" if "fp32" in variant else "bf16", peak_tflops)
