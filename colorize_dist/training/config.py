"""The training run's config: the `data`, `model` and `loss` sections of their packages plus `optim` and `train`.

    cfg = load_training_config("seed000", ["train.batch_size=32", "optim.lr=1e-4"])

Sizes that depend on the launch (processes, accumulation) are checked by `check_launch` once the
Accelerator knows the number of processes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from colorize_dist.config import ConfigError, check_choice, load_config
from colorize_dist.data.config import DataConfig
from colorize_dist.data.store import redact
from colorize_dist.eval.names import DIRECTION, INCEPTION_METRICS
from colorize_dist.models.config import LossConfig, ModelConfig, check_compatible

SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # ours → Accelerate's names
BEST_MODES = ("max", "min")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class OptimConfig:
    """Adam for both networks (the seeds: lr 2e-4, betas (0.5, 0.999))."""

    lr: float = 2e-4  # generator
    lr_discriminator: float | None = None  # None: same as lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm per network; 0 = no clipping
    schedule: str = "constant"  # after warm-up: constant | linear (to 0) | cosine (to 0) over the run
    warmup_steps: int = 0  # linear LR warm-up from 0

    def validate(self) -> None:
        if self.lr <= 0 or (self.lr_discriminator is not None and self.lr_discriminator <= 0):
            raise ConfigError(f"optim.lr and optim.lr_discriminator must be positive, got {self.lr}, "
                              f"{self.lr_discriminator}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"optim.betas must be [beta1, beta2] in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be ≥ 0")
        check_choice("optim.schedule", self.schedule, SCHEDULES)


@dataclass
class TrainConfig:
    run_dir: str | None = None  # None: runs/<config name>; --run-dir overrides
    seed: int = 0  # model initialisation and data order; same on every rank
    epochs: int = 100
    max_steps: int = 0  # > 0: stop after this many optimizer steps instead of `epochs`
    max_time: str | None = None  # wall-clock budget of each start, e.g. 2h, 90m, 1h30m, 45s: then stop resumably
    batch_size: int = 64  # global: per-process batch × processes × grad_accum
    allow_batch_change: bool = False  # resume a checkpoint trained with another batch_size (see training/resume.py)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str | None = None  # fp32 | fp16 | bf16; None: what `accelerate launch` was given, else fp32
    channels_last: bool = False
    compile: bool = False  # torch.compile both networks (inductor)
    pretrain_steps: int = 0  # generator-only steps (no adversarial term) before D joins (seed 002)
    ema_decay: float = 0.999  # EMA of the generator; validation, samples and exports use it
    log_every: int = 10  # optimizer steps between logged scalars; stop requests and max_time are checked then too
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (and at the end, and on SIGTERM/SIGUSR1)
    keep_checkpoints: int = 3  # the last K step checkpoints are kept; the best one is kept apart
    validate_every: int = 1000  # optimizer steps between validations (which update the best checkpoint)
    best_metric: str = "psnr_lab"  # key of compute_metrics' result that picks the best checkpoint
    fid_weights: str | None = None  # pytorch-fid Inception weights: adds fid, kid, inception_score to validation
    best_mode: str | None = None  # max | min; None: the metric's own direction (eval/names.py DIRECTION)
    init_generator: str | None = None  # RUN_OR_FILE: start G (and its EMA) from an exported generator (seed 002)
    sample_every: int = 500  # optimizer steps between sample grids
    num_samples: int = 8  # validation images in the sample grid
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps with a NaN/inf loss
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb
    synth_images: int = 1200  # the embedded default: synthetic images made when data.shards is not set
    # A collective (all-reduce, barrier, checkpoint) that waits longer than this for another rank ends the run with
    # one line naming the ranks that no longer answer; rank 0 alone may hash a large checkpoint meanwhile.
    collective_timeout_s: float = 600.0
    peak_tflops: float | None = None  # one GPU's dense peak for MFU; None: a known GPU's data sheet (costs.py)
    # A rank slower than the others' median by this fraction (forward time or data wait per step) for
    # straggler_intervals logging intervals in a row is named in a warning (training/telemetry.py).
    straggler_margin: float = 0.5
    straggler_intervals: int = 3
    profile: str | None = None  # START:STEPS: a torch.profiler trace of those steps (training/profile.py)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                     "validate_every", "sample_every", "num_samples", "max_nonfinite_steps", "synth_images",
                     "straggler_intervals"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.straggler_margin <= 0 or (self.peak_tflops is not None and self.peak_tflops <= 0):
            raise ConfigError(f"train.straggler_margin and train.peak_tflops must be positive, got "
                              f"{self.straggler_margin}, {self.peak_tflops}")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"train.collective_timeout_s must be positive, got {self.collective_timeout_s}")
        if self.max_steps < 0 or self.pretrain_steps < 0:
            raise ConfigError("train.max_steps and train.pretrain_steps must be ≥ 0")
        if self.max_time is not None:
            parse_duration("train.max_time", self.max_time)
        if self.profile is not None:
            parse_window(self.profile)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision is not None:
            check_choice("train.mixed_precision", self.mixed_precision, tuple(MIXED_PRECISION))
        check_choice("train.best_metric", self.best_metric, tuple(DIRECTION))
        if self.best_metric == "lpips":
            raise ConfigError("train.best_metric=lpips: validation does not compute LPIPS; use `colorize-dist eval "
                              "--lpips-weights` on the exports")
        if self.best_metric in INCEPTION_METRICS and self.fid_weights is None:
            raise ConfigError(f"train.best_metric={self.best_metric} needs train.fid_weights "
                              "(pytorch-fid's Inception weights)")
        if self.best_mode is not None:
            check_choice("train.best_mode", self.best_mode, BEST_MODES)
        if self.best_mode not in (None, DIRECTION[self.best_metric]):
            raise ConfigError(f"train.best_mode={self.best_mode} contradicts train.best_metric={self.best_metric} "
                              f"(better is {DIRECTION[self.best_metric]}); leave train.best_mode unset")
        if self.init_generator is not None and not self.init_generator.strip():
            raise ConfigError("train.init_generator must name a run directory or an exported generator file, or be "
                              "null")
        for tracker in self.trackers:
            check_choice("train.trackers", tracker, TRACKERS)

    @property
    def max_time_s(self) -> float | None:
        """train.max_time in seconds."""
        return None if self.max_time is None else parse_duration("train.max_time", self.max_time)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.loss, self.optim, self.train):
            section.validate()
        check_compatible(self.model.discriminator, self.loss)
        self.model.generator.check_resolution(self.data.resolution)
        if self.adversarial:
            self.model.discriminator.check_resolution(self.data.resolution)

    @property
    def adversarial(self) -> bool:
        """Whether the run trains a discriminator at all (loss.theta > 0)."""
        return self.loss.theta > 0


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([dhms]))+")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(name: str, text: str | int | float) -> float:
    """Seconds in "2h", "90m", "1h30m", "1d12h", "45s" or a plain number of seconds; ConfigError otherwise."""
    text = str(text).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        if DURATION.fullmatch(text) is None:
            raise ConfigError(f"{name}: expected a duration such as 2h, 90m, 1h30m or 45s, got {text!r}") from None
        seconds = sum(float(count) * SECONDS[unit] for count, unit in DURATION_PART.findall(text))
    if not seconds > 0:
        raise ConfigError(f"{name} must be positive, got {text!r}")
    return seconds


def parse_window(text: str) -> tuple[int, int]:
    """(START, STEPS) of train.profile's "START:STEPS"; ConfigError otherwise."""
    try:
        start, steps = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"train.profile={text!r}: expected START:STEPS, e.g. 100:5 (the 5 steps after step 100)"
                          ) from None
    if start < 0 or steps < 1:
        raise ConfigError(f"train.profile={text!r}: START must be ≥ 0 and STEPS ≥ 1")
    return start, steps


def load_training_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The validated config, with train.best_mode resolved to the metric's own direction (as config.yaml
    records it)."""
    cfg = load_config(Config, path, overrides)
    cfg.train.best_mode = cfg.train.best_mode or DIRECTION[cfg.train.best_metric]
    return cfg


def check_launch(cfg: TrainConfig, num_processes: int) -> int:
    """The per-process micro-batch size; ConfigError when the global batch does not split evenly."""
    share = num_processes * cfg.grad_accum
    if cfg.batch_size % share:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by processes × train.grad_accum = "
                          f"{num_processes} × {cfg.grad_accum} = {share}")
    return cfg.batch_size // share


def default_run_dir(cfg: Config, config_ref: str | Path) -> Path:
    """train.run_dir if set, else runs/<config name> (`runs/seed000` for `--config seed000` or seed000.yaml)."""
    return Path(cfg.train.run_dir or Path("runs") / Path(config_ref).stem)


def recorded_config(cfg: Config) -> Config:
    """`cfg` as the run's files and logs record it: a shard URL's credentials redacted."""
    shards = None if cfg.data.shards is None else redact(cfg.data.shards)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))


def flat_config(cfg: Config) -> dict[str, str | int | float | bool]:
    """The config as flat `section.key` scalars, as TensorBoard's hparams want them."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, (str, int, float, bool)) else str(value)

    walk("", dataclasses.asdict(cfg))
    return flat
