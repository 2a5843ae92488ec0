"""The training loop: a discriminator step and a generator step per optimizer step, DDP or DeepSpeed engines
under Accelerate, EMA, validation, checkpoints and resume — readable top to bottom. The command line is
`colorize_dist/training/command.py` (`accelerate launch colorize_dist/train.py`, `colorize-dist train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm import tqdm

from colorize_dist.config import ConfigError, save_config
from colorize_dist.data.loader import build_loader
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.models import DiscriminatorLoss, GeneratorLoss, build_discriminator, build_generator
from colorize_dist.models.export import save_generator
from colorize_dist.training import checkpoint
from colorize_dist.training.build import (
    build_accelerator,
    endless,
    input_dtype,
    prepare_network,
    synthetic_shards,
)
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import Config, check_launch, load_training_config
from colorize_dist.training.ema import EMA
from colorize_dist.training.samples import sample_grid, save_grid
from colorize_dist.training.stop import any_rank, stop_on_signals, stop_requested

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row; the message says where and what to try."""


@dataclass
class TrainResult:
    finished: bool  # False: stopped early on request, resumable
    step: int
    metrics: dict[str, float]  # the last validation
    generator: nn.Module  # bare modules (no DDP/DeepSpeed wrapper), for callers and tests
    discriminator: nn.Module | None
    ema: nn.Module


def train(cfg: Config, run_dir: Path, resume: str = "auto") -> TrainResult:
    accelerator = build_accelerator(cfg, run_dir)
    micro_batch = check_launch(cfg.train, accelerator.num_processes)
    device, main_process = accelerator.device, accelerator.is_main_process
    if cfg.data.shards is None:
        cfg.data.shards = str(synthetic_shards(accelerator, run_dir, cfg.train.synth_images, cfg.data.resolution))
    if main_process:
        warn_if_config_changed(cfg, run_dir / "config.yaml")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # Data: each rank reads its own part of every epoch; the order depends on (seed, epoch) only.
    loader = build_loader(cfg.data, "train", batch_size=micro_batch, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, device=device, seed=cfg.train.seed,
                          dtype=input_dtype(accelerator))
    val_loader = build_loader(cfg.data, "val", batch_size=micro_batch, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, device=device)
    sample_batch = (next(build_loader(cfg.data, "val", batch_size=cfg.train.num_samples, device=device).epoch(0))
                    if main_process else None)
    total_steps = cfg.train.max_steps or cfg.train.epochs * loader.batches_per_epoch // cfg.train.grad_accum

    # Losses first: a perceptual loss without VGG weights fails here, not an hour in.
    color_space = cfg.model.generator.color_space
    generator_loss = GeneratorLoss(cfg.loss, color_space).to(device)
    discriminator_loss = DiscriminatorLoss(cfg.loss)

    # Networks: the same initial weights on every rank (seeded), then wrapped by Accelerate.
    set_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator = build_generator(cfg.model.generator).to(device, memory_format=memory_format)
    ema = EMA(generator, cfg.train.ema_decay)
    generator, generator_update = prepare_network(accelerator, "generator", generator, cfg, cfg.optim.lr,
                                                  total_steps, micro_batch)
    discriminator = discriminator_update = None
    if cfg.adversarial:
        discriminator = build_discriminator(cfg.model.discriminator, cfg.model.generator.out_channels)
        discriminator, discriminator_update = prepare_network(
            accelerator, "discriminator", discriminator.to(device, memory_format=memory_format), cfg,
            cfg.optim.lr_discriminator or cfg.optim.lr, total_steps, micro_batch)
    networks = [net for net in (generator, discriminator) if net is not None]

    # Everything else a checkpoint must carry; Accelerate adds models, optimizers, schedulers, scaler, RNG.
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)
    resume_from = find_resume(accelerator, run_dir, resume)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {progress.step}")
    accelerator.init_trackers("colorize", config=flat_config(cfg))

    checkpoints, samples, export = run_dir / checkpoint.CHECKPOINTS, run_dir / "samples", run_dir / "export"
    metrics: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", disable=not main_process, dynamic_ncols=True)
    clock = Clock()
    stopped = False
    with stop_on_signals():
        for batch in clock.wait(endless(loader, progress.batches)):
            if progress.step >= total_steps:
                break
            progress.batches += 1
            l = batch.l.contiguous(memory_format=memory_format)
            ab = batch.ab.contiguous(memory_format=memory_format)
            adversarial = cfg.adversarial and progress.step >= cfg.train.pretrain_steps
            logs: dict[str, torch.Tensor | float | None] = {}  # read (a device sync) only on logging steps
            d_nonfinite = False
            with accelerator.accumulate(*networks):
                with accelerator.autocast():
                    fake = generator(l)

                # Discriminator step: real (L, ab) against the detached prediction.
                if adversarial:
                    with accelerator.autocast():
                        d_terms = discriminator_loss(discriminator, l, ab, fake)
                    (d_nonfinite,) = any_rank(~torch.isfinite(d_terms["total"]), device=device)
                    if d_nonfinite:
                        discriminator_update.discard()
                    else:
                        discriminator_update.backward(d_terms["total"])
                        logs["grad_norm/discriminator"] = discriminator_update.step()
                        logs.update({f"loss/d_{name}": value.detach() for name, value in d_terms.items()})

                # Generator step: reconstruction + perceptual (+ adversarial against the updated D, frozen).
                with accelerator.autocast():
                    if adversarial:
                        with frozen(discriminator, accelerator):
                            g_terms = generator_loss(l, fake, ab, discriminator(l, fake))
                    else:
                        g_terms = generator_loss(l, fake, ab)  # warm-up: no adversarial term
                (g_nonfinite,) = any_rank(~torch.isfinite(g_terms["total"]), device=device)
                if g_nonfinite:
                    generator_update.discard()
                else:
                    generator_update.backward(g_terms["total"])
                    logs["grad_norm/generator"] = generator_update.step()
                    logs.update({f"loss/g_{name}": value.detach() for name, value in g_terms.items()})

            # A NaN/inf loss on any rank skips that network's update on every rank; too many in a row stop the run.
            if g_nonfinite or d_nonfinite:
                progress.nonfinite += 1
                progress.nonfinite_in_a_row += 1
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{progress.nonfinite_in_a_row} batches in a row had a NaN/inf loss (step {progress.step}, "
                        f"{progress.nonfinite} in all); the last good checkpoint is in {checkpoints}. Try a lower "
                        "optim.lr, optim.grad_clip > 0, or bf16 instead of fp16")
            else:
                progress.nonfinite_in_a_row = 0
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            progress.step += 1
            ema.update(accelerator.unwrap_model(generator))
            bar.update()
            if progress.step % cfg.train.log_every == 0:
                rates = clock.lap(cfg.train.log_every * cfg.train.batch_size)
                logs = {key: float(value) for key, value in logs.items() if value is not None}
                logs |= rates | {"lr": generator_update.scheduler.get_last_lr()[0], "nonfinite": progress.nonfinite}
                accelerator.log(logs, step=progress.step)
                bar.set_postfix(status_line(logs), refresh=False)
            if progress.step % cfg.train.sample_every == 0 and main_process:
                write_samples(accelerator, ema.model, sample_batch, color_space, samples, progress.step)
            finished = progress.step >= total_steps
            if progress.step % cfg.train.validate_every == 0 or finished:
                metrics = validate(accelerator, cfg, ema.model, val_loader, progress, checkpoints, export)
            (stopped,) = any_rank(stop_requested(), device=device)  # the same decision on every rank
            if progress.step % cfg.train.checkpoint_every == 0 or finished or stopped:
                save_step_checkpoint(accelerator, cfg, checkpoints, progress)
            if stopped:
                accelerator.print(f"stop requested: checkpoint at step {progress.step} saved; resume with "
                                  "--resume auto")
            if stopped or finished:
                break
    bar.close()

    if main_process and not stopped:
        write_samples(accelerator, ema.model, sample_batch, color_space, samples, progress.step)
        save_generator(ema.model, cfg.model.generator, cfg.data.resolution, export / "generator_final.safetensors")
    if not stopped and not metrics:  # resumed a finished run: report its final state
        metrics = compute_metrics(ema.model, val_loader, device=device, fid_weights=cfg.train.fid_weights)
    accelerator.print(summary(cfg, progress, metrics, clock, run_dir, stopped))
    accelerator.end_training()
    return TrainResult(finished=not stopped, step=progress.step, metrics=metrics,
                       generator=accelerator.unwrap_model(generator),
                       discriminator=accelerator.unwrap_model(discriminator) if discriminator is not None else None,
                       ema=ema.model)


@contextlib.contextmanager
def frozen(discriminator: nn.Module, accelerator: Accelerator) -> Iterator[None]:
    """D scores the generator's output for G's loss: its weights take no gradient, and DDP expects none."""
    discriminator.requires_grad_(False)
    try:
        with accelerator.no_sync(discriminator):
            yield
    finally:
        discriminator.requires_grad_(True)


def find_resume(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, chosen by rank 0 (which checks files and checksums) for every rank."""
    choice: list[Path | str | None] = [None, None]  # checkpoint, problem with the requested one
    if accelerator.is_main_process and resume == "auto":
        choice = [checkpoint.latest_valid(run_dir / checkpoint.CHECKPOINTS), None]
    elif accelerator.is_main_process and resume != "none":
        choice = [Path(resume), checkpoint.check(Path(resume))]
    folder, problem = broadcast_object_list(choice)
    if problem is not None:  # raised on every rank alike
        raise ConfigError(f"--resume {resume}: not a usable checkpoint: {problem}")
    return folder


def save_step_checkpoint(accelerator: Accelerator, cfg: Config, root: Path, progress: Progress) -> None:
    checkpoint.save_checkpoint(accelerator, root / checkpoint.step_name(progress.step), step=progress.step)
    if accelerator.is_main_process:
        checkpoint.prune(root, cfg.train.keep_checkpoints)


def validate(accelerator: Accelerator, cfg: Config, ema: nn.Module, val_loader, progress: Progress,
             checkpoints: Path, export: Path) -> dict[str, float]:
    """Metrics of the EMA generator on the validation split (every rank); a new best is checkpointed and exported."""
    metrics = compute_metrics(ema, val_loader, device=accelerator.device, fid_weights=cfg.train.fid_weights)
    accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=progress.step)
    value = metrics[cfg.train.best_metric]
    better = max if cfg.train.best_mode == "max" else min
    if progress.best is None or better(value, progress.best) != progress.best:
        progress.best = value
        checkpoint.save_checkpoint(accelerator, checkpoints / checkpoint.BEST, step=progress.step,
                                   **{cfg.train.best_metric: value})
        if accelerator.is_main_process:
            save_generator(ema, cfg.model.generator, cfg.data.resolution, export / "generator_best.safetensors")
    return metrics


def write_samples(accelerator: Accelerator, ema: nn.Module, batch, color_space: str, folder: Path,
                  step: int) -> None:
    """The sample grid as RUN/samples/step-XXXXXXX.png and in TensorBoard (rank 0)."""
    grid = sample_grid(ema, batch, color_space)
    save_grid(grid, folder / f"{checkpoint.step_name(step)}.png")
    if any(tracker.name == "tensorboard" for tracker in accelerator.trackers):
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None]}, step=step)


class Clock:
    """Wall time, and the share of it spent waiting for the data loader."""

    def __init__(self):
        self.start = self.lap_start = time.perf_counter()
        self.waiting = 0.0

    def wait(self, batches: Iterator) -> Iterator:
        while True:
            before = time.perf_counter()
            batch = next(batches)
            self.waiting += time.perf_counter() - before
            yield batch

    def lap(self, images: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.lap_start
        rates = {"images_per_s": images / elapsed, "data_wait": self.waiting / elapsed}
        self.lap_start, self.waiting = now, 0.0
        return rates


def status_line(logs: dict[str, float]) -> dict[str, str]:
    short = {"loss/g_total": "G", "loss/d_total": "D", "images_per_s": "img/s", "data_wait": "wait"}
    return {label: f"{logs[key]:.3g}" for key, label in short.items() if key in logs}


def summary(cfg: Config, progress: Progress, metrics: dict[str, float], clock: Clock, run_dir: Path,
            stopped: bool) -> str:
    minutes, seconds = divmod(round(time.perf_counter() - clock.start), 60)
    scores = (f"val psnr_lab {metrics['psnr_lab']:.2f} dB (gray baseline {metrics['psnr_lab_gray']:.2f} dB), "
              f"best {cfg.train.best_metric} {progress.best:.4g}" if metrics else "not validated")
    return (f"{'stopped' if stopped else 'done'} at step {progress.step} after {minutes}m{seconds:02d}s: {scores}; "
            f"{progress.nonfinite} batches skipped for NaN/inf; run dir {run_dir}")


def warn_if_config_changed(cfg: Config, saved: Path) -> None:
    """A run directory reused with other settings is usually a mistake (or a deliberate extension): say which."""
    if not saved.is_file():
        return
    before = flat_config(load_training_config(saved))
    changed = sorted(key for key, value in flat_config(cfg).items() if before.get(key) != value)
    if changed:
        log.warning("%s: settings differ from the previous run in this directory: %s", saved, ", ".join(changed))


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

