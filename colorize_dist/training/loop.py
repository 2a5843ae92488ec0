"""The training loop: a discriminator step and a generator step per optimizer step, DDP or DeepSpeed engines
under Accelerate, EMA, validation, checkpoints and resume. The command line is `colorize_dist/training/command.py`
(`accelerate launch colorize_dist/train.py`, `colorize-dist train`).

    state = setup(accelerator, cfg, run_dir, resume)         # data, networks, optimizers, the resumed checkpoint
    while not state.done:
        micro_batches = next_micro_batches(state)             # this rank's share of one global batch
        outcome = gan_step(state, micro_batches)              # D's update, then G's: one optimizer step
        after_step(state, micro_batches, outcome)             # count, log, stop?, validate, checkpoint
    return finish(state)                                      # final samples, export, summary
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm import tqdm

from colorize_dist.config import ConfigError, save_config
from colorize_dist.data.loader import Batch, ColorLoader, build_loader, first_batch
from colorize_dist.eval.fid import load_inception
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.models import DiscriminatorLoss, GeneratorLoss, build_discriminator, build_generator
from colorize_dist.models.export import init_from_export, save_generator
from colorize_dist.training import checkpoint, peers
from colorize_dist.training.build import (
    build_accelerator,
    endless,
    input_dtype,
    prepare_network,
    stretch_schedule,
    synthetic_shards,
)
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import Config, check_launch, load_training_config
from colorize_dist.training.ema import EMA
from colorize_dist.training.resume import check_resume, find_resume, load_resume
from colorize_dist.training.rundir import run_dir_lock
from colorize_dist.training.stop import any_rank, launcher_lost, stop_on_signals, stop_requested, watch_launcher
from colorize_dist.training.summary import write_summary
from colorize_dist.training.update import Outcome, Update

log = logging.getLogger(__name__)

FEW_VALIDATION_IMAGES = 100  # below: the choice of the best checkpoint is warned about
STEP_RNG_STREAM = 2  # spawn key of the per-step torch seeds, apart from the data's (see data.sharding, augment)


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row; the message says where and what to try."""


@dataclass
class TrainResult:
    finished: bool  # False: stopped early on request or at train.max_time, resumable
    step: int
    metrics: dict[str, float]  # the last validation
    generator: nn.Module  # bare modules (no DDP/DeepSpeed wrapper), for callers and tests
    discriminator: nn.Module | None
    ema: nn.Module


@dataclass
class MicroBatch:
    l: torch.Tensor
    ab: torch.Tensor
    weight: float  # the share of real samples: losses are scaled by it, so padding copies count as zero samples
    batch: Batch  # where it came from (its epoch, its global batch, its samples)


@dataclass
class StepOutcome:
    generator: Outcome
    discriminator: Outcome | None  # None: no adversarial update in this step
    logs: dict[str, torch.Tensor | None]  # left on the device; read only on logging steps


@dataclass
class State:
    """Everything the loop works with, made by `setup`."""

    accelerator: Accelerator
    cfg: Config
    run_dir: Path
    loader: ColorLoader
    val_loader: ColorLoader
    sample_batch: Batch | None  # the fixed validation images of the sample grids (rank 0)
    generator: nn.Module  # as prepared: DDP module, plain module or DeepSpeed engine
    discriminator: nn.Module | None
    # The bare modules, wrappers removed (keep_torch_compile=False leaves a compiled module as it is): G without
    # gradients for D's update, the EMA's source; D scoring G's output for G's loss (no DDP or engine hooks run
    # for a backward that is G's).
    bare_generator: nn.Module
    bare_discriminator: nn.Module | None
    generator_update: Update
    discriminator_update: Update | None
    generator_loss: GeneratorLoss
    discriminator_loss: DiscriminatorLoss
    ema: EMA
    progress: Progress
    total_steps: int
    memory_format: torch.memory_format
    batches: Iterator[Batch]
    clock: Clock
    bar: tqdm
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why the run stopped early (resumable), if it did
    done: bool = False

    @property
    def networks(self) -> list[nn.Module]:
        return [net for net in (self.generator, self.discriminator) if net is not None]


def train(cfg: Config, run_dir: Path, resume: str = "auto") -> TrainResult:
    """Train `cfg` in `run_dir` (one run per directory at a time), resuming as `resume` says."""
    watch_launcher()  # an orphaned trainer stops (checkpoints) instead of training on
    accelerator = build_accelerator(cfg, run_dir)
    with peers.reporting_lost_peers(), run_dir_lock(accelerator, run_dir):  # PeerLostError: ranks gone
        state = setup(accelerator, cfg, run_dir, resume)
        with stop_on_signals(), contextlib.closing(state.bar):  # closed on errors too: a message starts its own line
            while not state.done:
                micro_batches = next_micro_batches(state)
                outcome = gan_step(state, micro_batches)
                after_step(state, micro_batches, outcome)
        return finish(state)


def setup(accelerator: Accelerator, cfg: Config, run_dir: Path, resume: str) -> State:
    """Data, losses, networks, optimizers and schedules, the resumed checkpoint; checked before the first step."""
    micro_batch = check_launch(cfg.train, accelerator.num_processes)
    device, main_process = accelerator.device, accelerator.is_main_process
    if cfg.data.shards is None:
        cfg.data.shards = str(synthetic_shards(accelerator, run_dir, cfg.train.synth_images, cfg.data.resolution))
    if main_process:
        warn_if_config_changed(cfg, run_dir / "config.yaml")
        save_config(cfg, run_dir / "config.yaml")

    # Data: every rank reads its share of each global batch; the order depends on (seed, epoch) only.
    ranks = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "device": device}
    loader = build_loader(cfg.data, "train", batch_size=micro_batch, global_batch=cfg.train.batch_size,
                          seed=cfg.train.seed, dtype=input_dtype(accelerator), **ranks)
    val_loader = build_loader(cfg.data, "val", batch_size=micro_batch, **ranks)
    sample_batch = (first_batch(cfg.data, "val", batch_size=cfg.train.num_samples, device=device)  # loader closed
                    if main_process else None)
    accelerator.print(f"data: {loader.describe()}")
    check_inputs(cfg, loader, val_loader, device)

    # Losses first: a perceptual loss without VGG weights fails here, not an hour in.
    generator_loss = GeneratorLoss(cfg.loss, cfg.model.generator.color_space).to(device)
    discriminator_loss = DiscriminatorLoss(cfg.loss)

    # Networks: the same initial weights on every rank (seeded, or train.init_generator's), then wrapped by
    # Accelerate. A resumed run takes G and its EMA from the checkpoint instead.
    point = find_resume(accelerator, run_dir, resume)
    if point is not None:
        check_resume(point, cfg, accelerator)
    total_steps = cfg.train.max_steps or cfg.train.epochs * loader.steps_per_epoch
    set_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    generator = build_generator(cfg.model.generator).to(device, memory_format=memory_format)
    if cfg.train.init_generator is not None and point is None:
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
    updates = [update for update in (generator_update, discriminator_update) if update is not None]

    # Everything else a checkpoint must carry; Accelerate adds models, optimizers, schedulers, RNG.
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress, *[u.scaler for u in updates if u.scaler is not None])
    if point is not None:
        load_resume(accelerator, point, [net for net in (generator, discriminator) if net is not None])
        accelerator.print(f"resumed from {point.folder} at step {progress.step} (epoch {progress.epoch}, sample "
                          f"{progress.sample} of {loader.samples})")
        if point.global_batch not in (None, cfg.train.batch_size) and not cfg.train.max_steps:
            total_steps = progress.step + remaining_steps(cfg, loader, progress)
        for update in updates:  # a run whose length changed (batch, epochs, max_steps) decays to its new end
            stretch_schedule(update.scheduler, cfg.optim, total_steps)
    accelerator.init_trackers("colorize", config=flat_config(cfg))

    clock = Clock(progress.wall_s)
    return State(
        accelerator=accelerator, cfg=cfg, run_dir=run_dir, loader=loader, val_loader=val_loader,
        sample_batch=sample_batch, generator=generator, discriminator=discriminator,
        bare_generator=accelerator.unwrap_model(generator, keep_torch_compile=False),
        bare_discriminator=(accelerator.unwrap_model(discriminator, keep_torch_compile=False)
                            if discriminator is not None else None),
        generator_update=generator_update, discriminator_update=discriminator_update, generator_loss=generator_loss,
        discriminator_loss=discriminator_loss, ema=ema, progress=progress, total_steps=total_steps,
        memory_format=memory_format, batches=clock.wait(endless(loader, progress.epoch, progress.sample)),
        clock=clock, done=progress.step >= total_steps,
        bar=tqdm(total=total_steps, initial=progress.step, unit="step", disable=not main_process, dynamic_ncols=True))


def next_micro_batches(state: State) -> list[MicroBatch]:
    """This rank's train.grad_accum micro-batches of the next global batch."""
    micro_batches = [take_micro_batch(state.batches, state.memory_format)
                     for _ in range(state.loader.layout.accumulation)]
    torch.manual_seed(step_seed(state.cfg.train.seed, micro_batches[0].batch, state.accelerator.process_index))
    return micro_batches


def gan_step(state: State, micro_batches: list[MicroBatch]) -> StepOutcome:
    """One optimizer step: D's update over all of the step's micro-batches, then G's against the updated D, as with
    one batch of train.batch_size (update.py: a backward per micro-batch, then each network's own unscale, clip,
    step and zero). One micro-batch: G's forward (and its graph) serves D's update, then G's own. Several: D's pass
    runs G without gradients and G's pass runs it again, so that no step holds every micro-batch's graph."""
    accelerator, generator, discriminator = state.accelerator, state.generator, state.bare_discriminator
    adversarial = state.cfg.adversarial and state.progress.step >= state.cfg.train.pretrain_steps
    logs: dict[str, torch.Tensor | None] = {}
    fakes: list[torch.Tensor | None] = [None] * len(micro_batches)

    # Discriminator: real (L, ab) against the detached prediction.
    d_outcome = None
    if adversarial:
        d_update = state.discriminator_update
        for index, micro in enumerate(micro_batches):
            with d_update.micro_batch(index):
                with accelerator.autocast():
                    if len(micro_batches) == 1:
                        fakes[index] = fake = generator(micro.l)
                    else:
                        with torch.no_grad():
                            fake = state.bare_generator(micro.l)
                    d_terms = state.discriminator_loss(state.discriminator, micro.l, micro.ab, fake)
                d_update.backward(d_terms["total"] * micro.weight)
            add_logs(logs, "loss/d_", d_terms, len(micro_batches))
        d_outcome = d_update.step()
        logs["grad_norm/discriminator"] = d_outcome.grad_norm

    # Generator: reconstruction + perceptual (+ adversarial: the updated D's score, its weights frozen).
    g_update = state.generator_update
    with frozen(discriminator):
        for index, micro in enumerate(micro_batches):
            with g_update.micro_batch(index):
                with accelerator.autocast():
                    fake = generator(micro.l) if fakes[index] is None else fakes[index]
                    scores = discriminator(micro.l, fake) if adversarial else None  # None: warm-up
                    g_terms = state.generator_loss(micro.l, fake, micro.ab, scores)
                g_update.backward(g_terms["total"] * micro.weight)
            add_logs(logs, "loss/g_", g_terms, len(micro_batches))
    g_outcome = g_update.step()
    logs["grad_norm/generator"] = g_outcome.grad_norm
    return StepOutcome(g_outcome, d_outcome, logs)


def after_step(state: State, micro_batches: list[MicroBatch], outcome: StepOutcome) -> None:
    """Count the step, then what is due at it: logs and the stop decision, samples, validation, checkpoint."""
    cfg, progress, accelerator = state.cfg, state.progress, state.accelerator

    # A NaN/inf on any rank skipped that network's whole update on every rank; too many in a row stop the run.
    if outcome.generator.applied and (outcome.discriminator is None or outcome.discriminator.applied):
        progress.nonfinite_in_a_row = 0
    else:
        progress.nonfinite += 1
        progress.nonfinite_in_a_row += 1
        if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{progress.nonfinite_in_a_row} steps in a row were skipped for a NaN/inf loss or gradient "
                f"(step {progress.step}, {progress.nonfinite} in all); the last good checkpoint is in "
                f"{state.run_dir / checkpoint.CHECKPOINTS}. Try a lower optim.lr, optim.grad_clip > 0, or bf16 "
                "instead of fp16")

    # The data moves on whatever happened; an optimizer step counts when G's update was applied (a skipped one is
    # tried again on the next data).
    slots = micro_batches[-1].batch.slots
    progress.images_seen += slots.step_end - slots.step_start
    progress.epoch, progress.sample = ((slots.epoch + 1, 0) if slots.step_end == state.loader.samples
                                       else (slots.epoch, slots.step_end))
    stepped = outcome.generator.applied
    if not stepped:
        return
    progress.step += 1
    state.ema.update(state.bare_generator)
    state.bar.update()
    state.done = progress.step >= state.total_steps

    # Logging steps also decide, on every rank alike, whether to stop early: a signal, a dead launcher, or
    # train.max_time spent (one all-reduce every train.log_every steps, which bounds the reaction time).
    if progress.step % cfg.train.log_every == 0:
        rates = state.clock.lap(cfg.train.log_every * cfg.train.batch_size)
        values = {key: float(value) for key, value in outcome.logs.items() if value is not None}
        values |= rates | {"lr": state.generator_update.scheduler.get_last_lr()[0], "nonfinite": progress.nonfinite}
        accelerator.log(values, step=progress.step)
        state.bar.set_postfix(status_line(values), refresh=False)
        state.stopped = stop_reason(state)
    if progress.step % cfg.train.sample_every == 0 and accelerator.is_main_process:
        write_samples(accelerator, state.ema.model, state.sample_batch, cfg.model.generator.color_space,
                      state.run_dir / "samples", progress.step)
    progress.wall_s = state.clock.total()  # as the checkpoints below record it
    if progress.step % cfg.train.validate_every == 0 or state.done:
        state.metrics = validate(state)
    if state.stopped or progress.step % cfg.train.checkpoint_every == 0 or state.done:
        save_step_checkpoint(accelerator, cfg, state.run_dir / checkpoint.CHECKPOINTS, progress, *state.networks,
                             state.ema.model)
    if state.stopped:
        accelerator.print(f"{state.stopped}: checkpoint at step {progress.step} saved; resume with --resume auto")
        state.done = True


def finish(state: State) -> TrainResult:
    """After the last step: the final samples and export, the last metrics, RUN/summary.json."""
    accelerator, cfg, progress = state.accelerator, state.cfg, state.progress
    ema = state.ema.model
    if accelerator.is_main_process and not state.stopped:
        write_samples(accelerator, ema, state.sample_batch, cfg.model.generator.color_space,
                      state.run_dir / "samples", progress.step)
        save_generator(ema, cfg.model.generator, cfg.data.resolution,
                       state.run_dir / "export" / "generator_final.safetensors")
    if not state.stopped and not state.metrics:  # resumed a finished run: report its final state
        state.metrics = compute_metrics(ema, state.val_loader, device=accelerator.device,
                                        fid_weights=cfg.train.fid_weights)
    accelerator.print(summary(state))
    write_summary(accelerator, cfg, state.run_dir, progress, state.metrics, total_steps=state.total_steps,
                  finished=not state.stopped, wall_s=state.clock.total())  # for studies (every rank: peak memory)
    accelerator.end_training()
    return TrainResult(finished=not state.stopped, step=progress.step, metrics=state.metrics,
                       generator=state.bare_generator, discriminator=state.bare_discriminator, ema=ema)


def take_micro_batch(batches: Iterator[Batch], memory_format: torch.memory_format) -> MicroBatch:
    """The next micro-batch without the padding copies that fill an epoch's last global batch (their mask is the
    loader's, on the host: reading `batch.valid` would wait for the device)."""
    batch = next(batches)
    valid = batch.slots.valid
    l, ab, real = batch.l, batch.ab, int(valid.sum())
    if 0 < real < len(valid):
        rows = torch.from_numpy(np.flatnonzero(valid)).to(l.device)
        l, ab = l.index_select(0, rows), ab.index_select(0, rows)
    # A micro-batch of padding only still runs, weighted 0: every rank must take part in each gradient reduction.
    return MicroBatch(l.contiguous(memory_format=memory_format), ab.contiguous(memory_format=memory_format),
                      weight=real / len(valid), batch=batch)


def step_seed(seed: int, batch: Batch, rank: int) -> int:
    """The torch seed of one rank's optimizer step (WGAN-GP's interpolation, dropout...), from (seed, the step's
    place in the data, rank): a resumed run draws what an uninterrupted one draws, on any number of processes."""
    entropy = [seed, STEP_RNG_STREAM, batch.slots.epoch, batch.slots.step_start, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def remaining_steps(cfg: Config, loader: ColorLoader, progress: Progress) -> int:
    """Optimizer steps left to the end of train.epochs from the resumed data position, at this run's batch."""
    if progress.epoch >= cfg.train.epochs:
        return 0
    return (loader.layout.steps(loader.samples, progress.sample)
            + (cfg.train.epochs - progress.epoch - 1) * loader.steps_per_epoch)


def stop_reason(state: State) -> str | None:
    """Why to stop now, the same on every rank (one all-reduce): a stop signal, a dead launcher, train.max_time."""
    budget = state.cfg.train.max_time_s
    over_time = budget is not None and state.clock.elapsed() >= budget
    requested, lost, over_time = any_rank(stop_requested(), launcher_lost(), over_time,
                                          device=state.accelerator.device)
    if lost:
        return "launcher gone (a rank's parent process died)"
    if requested:
        return "stop requested"
    return f"train.max_time={state.cfg.train.max_time} spent" if over_time else None


def add_logs(logs: dict[str, torch.Tensor | None], prefix: str, terms: dict[str, torch.Tensor],
             micro_batches: int) -> None:
    """Adds each loss term's share of the step's mean over micro-batches (on the device)."""
    for name, value in terms.items():
        key = prefix + name
        logs[key] = logs.get(key, 0.0) + value.detach().float() / micro_batches


@contextlib.contextmanager
def frozen(discriminator: nn.Module | None) -> Iterator[None]:
    """D scores the generator's output for G's loss: its weights take no gradient."""
    if discriminator is None:
        yield
        return
    discriminator.requires_grad_(False)
    try:
        yield
    finally:
        discriminator.requires_grad_(True)


def check_inputs(cfg: Config, loader: ColorLoader, val_loader: ColorLoader, device: torch.device) -> None:
    """What would otherwise fail hours in, or silently: checked before the first step."""
    if cfg.train.batch_size > loader.samples:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                          f"({loader.samples} images in {cfg.data.shards}); lower train.batch_size or add images")
    if cfg.train.fid_weights is not None:
        load_inception(cfg.train.fid_weights, device)  # missing: FileNotFoundError naming it; cached for validation
    if "wandb" in cfg.train.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.trackers names wandb, which is not installed: pip install wandb, or drop it")


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
    save_checkpoint(accelerator, cfg, root / checkpoint.step_name(progress.step), progress)
    if accelerator.is_main_process:
        checkpoint.prune(root, cfg.train.keep_checkpoints)


def save_checkpoint(accelerator: Accelerator, cfg: Config, folder: Path, progress: Progress, **info: float) -> None:
    """`checkpoint.save_checkpoint` with what a resume checks: the processes and the global batch."""
    checkpoint.save_checkpoint(accelerator, folder, step=progress.step, world_size=accelerator.num_processes,
                               global_batch=cfg.train.batch_size, **info)


def validate(state: State) -> dict[str, float]:
    """Metrics of the EMA generator on the validation split (every rank); a new best is checkpointed and exported."""
    accelerator, cfg, progress = state.accelerator, state.cfg, state.progress
    metrics = compute_metrics(state.ema.model, state.val_loader, device=accelerator.device,
                              fid_weights=cfg.train.fid_weights)
    accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=progress.step)
    value = metrics[cfg.train.best_metric]
    if improves(value, progress.best, cfg.train.best_mode):
        if progress.best is None and state.val_loader.samples < FEW_VALIDATION_IMAGES:
            log.warning("the best checkpoint (train.best_metric) and its export are chosen on the %d images of the "
                        "validation split of %s, so few that the choice is mostly noise; make the set with a "
                        "larger --val-fraction", state.val_loader.samples, cfg.data.shards)
        progress.best = value
        save_checkpoint(accelerator, cfg, state.run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST, progress,
                        **{cfg.train.best_metric: value})
        if accelerator.is_main_process:
            save_generator(state.ema.model, cfg.model.generator, cfg.data.resolution,
                           state.run_dir / "export" / "generator_best.safetensors")
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
    """Wall time (this start's, and the run's over all its starts), and the share spent waiting for data."""

    def __init__(self, before: float = 0.0):
        self.before = before  # the run's training time before this start
        self.start = self.lap_start = time.perf_counter()
        self.waiting = 0.0

    def elapsed(self) -> float:
        """Seconds since this start."""
        return time.perf_counter() - self.start

    def total(self) -> float:
        """The run's training time over all its starts."""
        return self.before + self.elapsed()

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


def summary(state: State) -> str:
    cfg, progress, metrics = state.cfg, state.progress, state.metrics
    minutes, seconds = divmod(round(state.clock.elapsed()), 60)
    best = "none" if progress.best is None else f"{progress.best:.4g}"  # None: every validation was NaN
    scores = (f"val psnr_lab {metrics['psnr_lab']:.2f} dB (gray baseline {metrics['psnr_lab_gray']:.2f} dB), "
              f"best {cfg.train.best_metric} {best}" if metrics else "not validated")
    return (f"{'stopped' if state.stopped else 'done'} at step {progress.step} after {minutes}m{seconds:02d}s: "
            f"{scores}; {progress.nonfinite} steps skipped for NaN/inf; run dir {state.run_dir}")


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
