"""The training loop: a discriminator step and a generator step per optimizer step, DDP or DeepSpeed engines
under Accelerate, EMA, validation, checkpoints and resume — readable top to bottom. The command line is
`colorize_dist/training/command.py` (`accelerate launch colorize_dist/train.py`, `colorize-dist train`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm import tqdm

from colorize_dist.config import ConfigError, save_config
from colorize_dist.data.loader import Batch, ColorLoader, build_loader, first_batch
from colorize_dist.eval.fid import load_inception
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.files import first_line
from colorize_dist.models import DiscriminatorLoss, GeneratorLoss, build_discriminator, build_generator
from colorize_dist.models.export import init_from_export, save_generator
from colorize_dist.training import checkpoint, peers
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
from colorize_dist.training.rundir import run_dir_lock
from colorize_dist.training.stop import any_rank, stop_on_signals, stop_requested
from colorize_dist.training.summary import write_summary

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
    """Train `cfg` in `run_dir` (one run per directory at a time), resuming as `resume` says."""
    accelerator = build_accelerator(cfg, run_dir)
    with peers.reporting_lost_peers(), run_dir_lock(accelerator, run_dir):  # PeerLostError: ranks gone
        return run_training(accelerator, cfg, run_dir, resume)


def run_training(accelerator: Accelerator, cfg: Config, run_dir: Path, resume: str) -> TrainResult:
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
    sample_batch = (first_batch(cfg.data, "val", batch_size=cfg.train.num_samples, device=device)  # loader closed
                    if main_process else None)
    accelerator.print(f"data: {loader.describe()}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * loader.batches_per_epoch // cfg.train.grad_accum
    check_inputs(cfg, loader, device)

    # Losses first: a perceptual loss without VGG weights fails here, not an hour in.
    color_space = cfg.model.generator.color_space
    generator_loss = GeneratorLoss(cfg.loss, color_space).to(device)
    discriminator_loss = DiscriminatorLoss(cfg.loss)

    # Networks: the same initial weights on every rank (seeded, or train.init_generator's), then wrapped by
    # Accelerate. A resumed run takes G and its EMA from the checkpoint instead.
    resume_from = find_resume(accelerator, run_dir, resume)
    set_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator = build_generator(cfg.model.generator).to(device, memory_format=memory_format)
    if cfg.train.init_generator is not None and resume_from is None:
        source = init_from_export(generator, cfg.model.generator, cfg.train.init_generator)  # ConfigError: 1 line
        accelerator.print(f"generator initialised from {source}")
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
    # The bare modules, wrappers removed (keep_torch_compile=False leaves a compiled wrapper as it is): G without
    # gradients for D's update, D scoring G's output for G's loss (no DDP or engine hooks), the EMA's source.
    bare_generator = accelerator.unwrap_model(generator, keep_torch_compile=False)
    bare_discriminator = (accelerator.unwrap_model(discriminator, keep_torch_compile=False)
                          if discriminator is not None else None)
    scalers = [update.scaler for update in (generator_update, discriminator_update)
               if update is not None and update.scaler is not None]  # fp16 without DeepSpeed: one per network

    # Everything else a checkpoint must carry; Accelerate adds models, optimizers, schedulers, RNG.
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress, *scalers)
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, KeyError, ValueError) as exc:  # e.g. a model shape changed since it was saved
            raise ConfigError(f"checkpoint {resume_from} does not fit this config ({first_line(exc)}); resume with "
                              "the config it was saved with, or start afresh with --resume none or another "
                              "--run-dir") from None
        accelerator.print(f"resumed from {resume_from} at step {progress.step}")
    accelerator.init_trackers("colorize", config=flat_config(cfg))

    checkpoints, samples, export = run_dir / checkpoint.CHECKPOINTS, run_dir / "samples", run_dir / "export"
    metrics: dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=progress.step, unit="step", disable=not main_process, dynamic_ncols=True)
    clock = Clock()
    stopped = False
    with stop_on_signals(), contextlib.closing(bar):  # closed on errors too, so a message starts its own line
        batches = clock.wait(endless(loader, progress.batches))
        while progress.step < total_steps:
            # One optimizer step: train.grad_accum micro-batches per rank; D's update over all of them, then G's
            # against the updated D, as with one batch of train.batch_size (update.py: a backward per micro-batch,
            # then each network's own unscale, clip, step and zero).
            micro_batches = [take_micro_batch(batches, loader, progress, memory_format)
                             for _ in range(cfg.train.grad_accum)]
            adversarial = cfg.adversarial and progress.step >= cfg.train.pretrain_steps
            logs: dict[str, torch.Tensor | None] = {}  # left on the device; read only on logging steps
            # One micro-batch: G's forward (and its graph) serves D's update, then G's own. Several: D's pass runs G
            # without gradients and G's pass runs it again, so that no step holds every micro-batch's graph.
            fakes: list[torch.Tensor | None] = [None] * len(micro_batches)

            # Discriminator: real (L, ab) against the detached prediction.
            d_outcome = None
            if adversarial:
                for index, micro in enumerate(micro_batches):
                    with discriminator_update.micro_batch(index):
                        with accelerator.autocast():
                            if len(micro_batches) == 1:
                                fakes[index] = fake = generator(micro.l)
                            else:
                                with torch.no_grad():
                                    fake = bare_generator(micro.l)
                            d_terms = discriminator_loss(discriminator, micro.l, micro.ab, fake)
                        discriminator_update.backward(d_terms["total"] * micro.weight)
                    add_logs(logs, "loss/d_", d_terms, len(micro_batches))
                d_outcome = discriminator_update.step()
                logs["grad_norm/discriminator"] = d_outcome.grad_norm

            # Generator: reconstruction + perceptual (+ adversarial: the updated D's score, its weights frozen).
            with frozen(bare_discriminator):
                for index, micro in enumerate(micro_batches):
                    with generator_update.micro_batch(index):
                        with accelerator.autocast():
                            fake = generator(micro.l) if fakes[index] is None else fakes[index]
                            scores = bare_discriminator(micro.l, fake) if adversarial else None  # None: warm-up
                            g_terms = generator_loss(micro.l, fake, micro.ab, scores)
                        generator_update.backward(g_terms["total"] * micro.weight)
                    add_logs(logs, "loss/g_", g_terms, len(micro_batches))
            g_outcome = generator_update.step()
            logs["grad_norm/generator"] = g_outcome.grad_norm

            # A NaN/inf on any rank skipped that network's whole update on every rank; too many in a row stop the run.
            if g_outcome.applied and (d_outcome is None or d_outcome.applied):
                progress.nonfinite_in_a_row = 0
            else:
                progress.nonfinite += 1
                progress.nonfinite_in_a_row += 1
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{progress.nonfinite_in_a_row} steps in a row were skipped for a NaN/inf loss or gradient "
                        f"(step {progress.step}, {progress.nonfinite} in all); the last good checkpoint is in "
                        f"{checkpoints}. Try a lower optim.lr, optim.grad_clip > 0, or bf16 instead of fp16")

            # An optimizer step counts when G's update was applied; a skipped one is tried again on the next data.
            stepped = g_outcome.applied
            if stepped:
                progress.step += 1
                ema.update(bare_generator)
                bar.update()
            finished = progress.step >= total_steps
            if stepped and progress.step % cfg.train.log_every == 0:
                rates = clock.lap(cfg.train.log_every * cfg.train.batch_size)
                values = {key: float(value) for key, value in logs.items() if value is not None}
                values |= rates | {"lr": generator_update.scheduler.get_last_lr()[0], "nonfinite": progress.nonfinite}
                accelerator.log(values, step=progress.step)
                bar.set_postfix(status_line(values), refresh=False)
            if stepped and progress.step % cfg.train.sample_every == 0 and main_process:
                write_samples(accelerator, ema.model, sample_batch, color_space, samples, progress.step)
            if stepped and (progress.step % cfg.train.validate_every == 0 or finished):
                metrics = validate(accelerator, cfg, ema.model, val_loader, progress, checkpoints, export)
            (stopped,) = any_rank(stop_requested(), device=device)  # the same decision on every rank
            if stopped or (stepped and (progress.step % cfg.train.checkpoint_every == 0 or finished)):
                save_step_checkpoint(accelerator, cfg, checkpoints, progress, *networks, ema.model)
            if stopped:
                accelerator.print(f"stop requested: checkpoint at step {progress.step} saved; resume with "
                                  "--resume auto")
            if stopped or finished:
                break

    if main_process and not stopped:
        write_samples(accelerator, ema.model, sample_batch, color_space, samples, progress.step)
        save_generator(ema.model, cfg.model.generator, cfg.data.resolution, export / "generator_final.safetensors")
    if not stopped and not metrics:  # resumed a finished run: report its final state
        metrics = compute_metrics(ema.model, val_loader, device=device, fid_weights=cfg.train.fid_weights)
    accelerator.print(summary(cfg, progress, metrics, clock, run_dir, stopped))
    write_summary(accelerator, cfg, run_dir, progress, metrics, total_steps=total_steps, finished=not stopped,
                  started=clock.start)  # RUN/summary.json, for studies (every rank: peak memory)
    accelerator.end_training()
    return TrainResult(finished=not stopped, step=progress.step, metrics=metrics,
                       generator=bare_generator, discriminator=bare_discriminator, ema=ema.model)


@dataclass
class MicroBatch:
    l: torch.Tensor
    ab: torch.Tensor
    weight: float  # the share of real samples: losses are scaled by it, so padding copies count as zero samples


def take_micro_batch(batches: Iterator[Batch], loader: ColorLoader, progress: Progress,
                     memory_format: torch.memory_format) -> MicroBatch:
    """The next micro-batch without the padding copies that even out the ranks at an epoch's end (their mask is
    the loader's, on the host: reading `batch.valid` would wait for the device)."""
    batch = next(batches)
    valid = loader.ranks.valid(progress.batches % loader.batches_per_epoch)
    progress.batches += 1
    l, ab, real = batch.l, batch.ab, int(valid.sum())
    if 0 < real < len(valid):
        rows = torch.from_numpy(np.flatnonzero(valid)).to(l.device)
        l, ab = l.index_select(0, rows), ab.index_select(0, rows)
    # A micro-batch of padding only (possible when ranks' shares differ by one) still runs, weighted 0: every
    # rank must take part in each gradient reduction.
    return MicroBatch(l.contiguous(memory_format=memory_format), ab.contiguous(memory_format=memory_format),
                      weight=real / len(valid))


def add_logs(logs: dict[str, torch.Tensor | None], prefix: str, terms: dict[str, torch.Tensor],
             micro_batches: int) -> None:
    """Adds each loss term's share of the step's mean over micro-batches (on the device)."""
    for name, value in terms.items():
        key = prefix + name
        logs[key] = logs.get(key, 0.0) + value.detach().float() / micro_batches


@contextlib.contextmanager
def frozen(discriminator: nn.Module | None) -> Iterator[None]:
    """D scores the generator's output for G's loss: its weights take no gradient (the bare module: no DDP hooks
    or engine bookkeeping run for a backward that is G's)."""
    if discriminator is None:
        yield
        return
    discriminator.requires_grad_(False)
    try:
        yield
    finally:
        discriminator.requires_grad_(True)


def check_inputs(cfg: Config, loader: ColorLoader, device: torch.device) -> None:
    """What would otherwise fail hours in, or silently: checked before the first step."""
    samples = loader.ranks.total
    if cfg.train.batch_size > samples:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                          f"({samples} images in {cfg.data.shards}); lower train.batch_size or add images")
    if cfg.train.fid_weights is not None:
        load_inception(cfg.train.fid_weights, device)  # missing: FileNotFoundError naming it; cached for validation
    if "wandb" in cfg.train.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.trackers names wandb, which is not installed: pip install wandb, or drop it")


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


def save_step_checkpoint(accelerator: Accelerator, cfg: Config, root: Path, progress: Progress,
                         *modules: nn.Module) -> None:
    """The step checkpoint, unless the weights of `modules` went NaN/inf (e.g. an LR far too high): a poisoned
    checkpoint would be resumed from, so the run stops and the last good one stays the newest."""
    finite = torch.stack([param.detach().isfinite().all() for module in modules for param in module.parameters()])
    (poisoned,) = any_rank(~finite.all(), device=accelerator.device)
    if poisoned:
        raise NonFiniteLossError(
            f"the weights became NaN/inf by step {progress.step} and were not checkpointed; the last good checkpoint "
            f"is {checkpoint.latest_valid(root, verify_hashes=False) or 'none (start afresh)'}. Try a lower "
            "optim.lr, optim.grad_clip > 0, or bf16 instead of fp16")
    checkpoint.save_checkpoint(accelerator, root / checkpoint.step_name(progress.step), step=progress.step)
    if accelerator.is_main_process:
        checkpoint.prune(root, cfg.train.keep_checkpoints)


def validate(accelerator: Accelerator, cfg: Config, ema: nn.Module, val_loader, progress: Progress,
             checkpoints: Path, export: Path) -> dict[str, float]:
    """Metrics of the EMA generator on the validation split (every rank); a new best is checkpointed and exported."""
    metrics = compute_metrics(ema, val_loader, device=accelerator.device, fid_weights=cfg.train.fid_weights)
    accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=progress.step)
    value = metrics[cfg.train.best_metric]
    if improves(value, progress.best, cfg.train.best_mode):
        progress.best = value
        checkpoint.save_checkpoint(accelerator, checkpoints / checkpoint.BEST, step=progress.step,
                                   **{cfg.train.best_metric: value})
        if accelerator.is_main_process:
            save_generator(ema, cfg.model.generator, cfg.data.resolution, export / "generator_best.safetensors")
    return metrics


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether a validation value is a new best. NaN never is (a diverged EMA must not replace the best
    checkpoint and export), and a NaN best, should one have been saved, is beaten by any number."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


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
    best = "none" if progress.best is None else f"{progress.best:.4g}"  # None: every validation was NaN
    scores = (f"val psnr_lab {metrics['psnr_lab']:.2f} dB (gray baseline {metrics['psnr_lab_gray']:.2f} dB), "
              f"best {cfg.train.best_metric} {best}" if metrics else "not validated")
    return (f"{'stopped' if stopped else 'done'} at step {progress.step} after {minutes}m{seconds:02d}s: {scores}; "
            f"{progress.nonfinite} steps skipped for NaN/inf; run dir {run_dir}")


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

