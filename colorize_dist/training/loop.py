"""The training loop and its step: a discriminator update and a generator update per optimizer step, DDP or
DeepSpeed engines under Accelerate. The command line is `colorize_dist/commands/train.py` (`accelerate launch
colorize_dist/train.py`, `colorize-dist train`); the loop's parts are made in build.py, validation, the best and
step checkpoints and the samples are milestones.py's, the clock and the final summary summary.py's.

    state = setup(accelerator, cfg, run_dir, resume)         # data, networks, optimizers, the resumed checkpoint
    while not state.done:
        micro_batches = next_micro_batches(state)             # this rank's share of one global batch
        outcome = gan_step(state, micro_batches)              # D's update, then G's: one optimizer step
        after_step(state, micro_batches, outcome)             # count, log, stop?, validate, checkpoint
    return finish(state)                                      # final samples, export, summary
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from torch import nn

from colorize_dist.data.loader import Batch, ShardServerDown, agree_on_outage
from colorize_dist.data.manifest import ShardsUnavailable
from colorize_dist.errors import UserError
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.models.export import save_generator
from colorize_dist.training import checkpoint, elastic, peers, telemetry
from colorize_dist.training.build import State, build_accelerator, setup
from colorize_dist.training.config import Config
from colorize_dist.training.milestones import NonFiniteLossError, save_step_checkpoint, validate, write_samples
from colorize_dist.training.rundir import run_dir_lock
from colorize_dist.training.stop import launcher_lost, stop_on_signals, stop_requested, watch_launcher
from colorize_dist.training.summary import summary, write_summary
from colorize_dist.training.update import Outcome

STEP_RNG_STREAM = 2  # spawn key of the per-step torch seeds, apart from the data's (see data.sharding, augment)


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
    mask: torch.Tensor | None  # (B,) on the device: 1 for real samples, 0 for padding copies; None: all real
    batch: Batch  # where it came from (its epoch, its global batch, its samples)


@dataclass
class StepOutcome:
    generator: Outcome
    discriminator: Outcome | None  # None: no adversarial update in this step
    logs: dict[str, torch.Tensor | None]  # left on the device; read only on logging steps


def train(cfg: Config, run_dir: Path, resume: str = "auto", cpu: bool = False) -> TrainResult:
    """Train `cfg` in `run_dir` (one run per directory at a time), resuming as `resume` says; on the CPU if `cpu`,
    even where there are GPUs."""
    watch_launcher()  # an orphaned trainer stops (checkpoints) instead of training on
    accelerator = build_accelerator(cfg, run_dir, cpu)
    state = None
    try:
        with peers.reporting_lost_peers(), run_dir_lock(accelerator, run_dir):  # PeerLostError: ranks gone
            state = setup(accelerator, cfg, run_dir, resume)
            with stop_on_signals(), contextlib.closing(state.bar):  # closed on errors too: a message starts a line
                try:
                    while not state.done:
                        micro_batches = next_micro_batches(state)
                        outcome = gan_step(state, micro_batches)
                        after_step(state, micro_batches, outcome)
                except ShardServerDown as down:  # on every rank alike: at a step's start or a validation's end
                    stop_for_outage(state, down.reason)
            return finish(state)
    except peers.PeerLostError as exc:
        if exc.first:  # for the restart's report (elastic.restart_report); the lost-rank line matters more
            with contextlib.suppress(OSError):
                elastic.record_loss(run_dir, exc.lost, state.progress.step if state is not None else None,
                                    accelerator.num_processes)
        raise


def next_micro_batches(state: State) -> list[MicroBatch]:
    """This rank's train.grad_accum micro-batches of the next global batch. From a URL, every rank also says
    whether it has them, before any rank starts the step (whose gradient reductions a rank without data would
    never join): where one has not, all stop together after a checkpoint (`stop_for_outage`)."""
    unavailable = None
    try:
        micro_batches = [take_micro_batch(state.batches, state.memory_format)
                         for _ in range(state.loader.layout.accumulation)]
    except ShardsUnavailable as exc:  # the server stopped answering: raised on this rank only
        unavailable = exc
    agree_on_outage(state.loader, unavailable)  # ShardServerDown on every rank, or nothing
    torch.manual_seed(step_seed(state.cfg.train.seed, micro_batches[0].batch, state.accelerator.process_index))
    return micro_batches


def stop_for_outage(state: State, reason: str) -> NoReturn:
    """Every rank, when any rank's shard server stopped answering (`reason`, its line): the usual stop checkpoint
    of the last finished step (unless it has one), then one line per node saying how to go on."""
    progress, cfg, accelerator = state.progress, state.cfg, state.accelerator
    if progress.step == 0:
        how = "no step was trained: rerun once it answers"
    else:
        if state.checkpointed_step != progress.step:
            progress.wall_s = state.clock.total()
            save_step_checkpoint(accelerator, cfg, state.run_dir / checkpoint.CHECKPOINTS, progress,
                                 *state.networks, state.ema.model)
        checkpoint.wait_for_saves(accelerator)
        how = (f"checkpoint at step {progress.step} saved; once it answers, rerun with `--resume auto` to continue "
               "from it")
    raise UserError(f"{reason}; {how}" if accelerator.is_local_main_process else "")


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
                    d_terms = state.discriminator_loss(state.discriminator, micro.l, micro.ab, fake, micro.mask,
                                                      bare=discriminator)
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
                    g_terms = state.generator_loss(micro.l, fake, micro.ab, scores, micro.mask)
                g_update.backward(g_terms["total"] * micro.weight)
            add_logs(logs, "loss/g_", g_terms, len(micro_batches))
    g_outcome = g_update.step()
    logs["grad_norm/generator"] = g_outcome.grad_norm
    return StepOutcome(g_outcome, d_outcome, logs)


def after_step(state: State, micro_batches: list[MicroBatch], outcome: StepOutcome) -> None:
    """Count the step, then what is due at it: logs and the stop decision, samples, validation, checkpoint."""
    cfg, progress, accelerator = state.cfg, state.progress, state.accelerator

    # The step counts and the data moves on whatever happened: a NaN/inf on any rank skipped that network's whole
    # update on every rank, decided on the device. The skips are tallied there too and read on logging and
    # checkpoint steps only (where too many in a row stop the run), so that the host never waits for the device
    # in between and can queue the next step.
    slots = micro_batches[-1].batch.slots
    progress.images_seen += slots.step_end - slots.step_start
    progress.epoch, progress.sample = ((slots.epoch + 1, 0) if slots.step_end == state.loader.samples
                                       else (slots.epoch, slots.step_end))
    progress.step += 1
    state.skipped.add(outcome.generator, outcome.discriminator)
    state.ema.update(state.bare_generator)
    state.bar.update()
    state.done = progress.step >= state.total_steps

    state.telemetry.tick()
    if state.profile is not None:
        state.profile.step(progress.step)

    # Logging steps also decide, on every rank alike, whether to stop early: a signal, a dead launcher, or
    # train.max_time spent (one all-gather every train.log_every steps, which bounds the reaction time). The
    # decision comes first, on the control group: where a peer is lost it fails at once, before anything waits for
    # the device (behind a gradient reduction that the lost peer never joins).
    if progress.step % cfg.train.log_every == 0:
        state.stopped = log_interval(state, outcome)
        state.divergence.losses(progress.step, outcome.logs)  # DivergedError: the losses exploded
    elif progress.step % cfg.train.checkpoint_every == 0 or state.done:
        count_skipped(state)
    if progress.step % cfg.train.sample_every == 0 and accelerator.is_main_process:
        write_samples(accelerator, state.ema.model, state.sample_batch, cfg.model.generator.color_space,
                      state.run_dir / "samples", progress.step)
    progress.wall_s = state.clock.total()  # as the checkpoints below record it
    if progress.step % cfg.train.validate_every == 0 or state.done:
        state.metrics = validate(state)
    if state.stopped or progress.step % cfg.train.checkpoint_every == 0 or state.done:
        started = time.perf_counter()
        save_step_checkpoint(accelerator, cfg, state.run_dir / checkpoint.CHECKPOINTS, progress, *state.networks,
                             state.ema.model)
        state.checkpointed_step = progress.step
        blocked = time.perf_counter() - started
        state.telemetry.blocked(blocked)
        accelerator.print(f"checkpoint {checkpoint.step_name(progress.step)}: the step waited {blocked:.2f} s")
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
    checkpoint.wait_for_saves(accelerator)  # the last one complete before the summary says the run is resumable
    accelerator.print(summary(state))
    write_summary(accelerator, cfg, state.run_dir, progress, state.metrics, total_steps=state.total_steps,
                  finished=not state.stopped, wall_s=state.clock.total(),
                  worse_than_gray=state.divergence.worse_than_gray)  # for studies (every rank: peak memory)
    accelerator.end_training()
    return TrainResult(finished=not state.stopped, step=progress.step, metrics=state.metrics,
                       generator=state.bare_generator, discriminator=state.bare_discriminator, ema=ema)


def take_micro_batch(batches: Iterator[Batch], memory_format: torch.memory_format) -> MicroBatch:
    """The next micro-batch, padding copies included: the losses give them weight 0 (`mask`), so every micro-batch
    has the same shape on every rank and a compiled network never recompiles at an epoch's end on some ranks while
    the others wait in a gradient reduction. The mask is the loader's, on the host (reading `batch.valid` would
    wait for the device). A micro-batch of padding only still runs, weighted 0: every rank takes part in each
    gradient reduction."""
    batch = next(batches)
    valid = batch.slots.valid
    real = int(valid.sum())
    mask = None if real == len(valid) else torch.from_numpy(valid.astype(np.float32)).to(batch.l.device)
    return MicroBatch(batch.l.contiguous(memory_format=memory_format), batch.ab.contiguous(memory_format=memory_format),
                      weight=real / len(valid), mask=mask, batch=batch)


def count_skipped(state: State) -> None:
    """The device's tally of skipped steps into `progress` (waits for the device); too many in a row stop the run."""
    progress = state.progress
    skipped, progress.nonfinite_in_a_row, longest = state.skipped.read()
    progress.nonfinite += skipped
    if longest >= state.cfg.train.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{longest} steps in a row were skipped for a NaN/inf loss or gradient (step {progress.step}, "
            f"{progress.nonfinite} in all); the last good checkpoint is in {state.run_dir / checkpoint.CHECKPOINTS}. "
            "Try a lower optim.lr, optim.grad_clip > 0, or bf16 instead of fp16")


def step_seed(seed: int, batch: Batch, rank: int) -> int:
    """The torch seed of one rank's optimizer step (WGAN-GP's interpolation, dropout...), from (seed, the step's
    place in the data, rank): a resumed run draws what an uninterrupted one draws, on any number of processes."""
    entropy = [seed, STEP_RNG_STREAM, batch.slots.epoch, batch.slots.step_start, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def log_interval(state: State, outcome: StepOutcome) -> str | None:
    """A logging step on every rank: the interval's figures of every rank (RUN/metrics.jsonl, trackers, progress
    bar) and the stop decision, in one all-gather. Returns why to stop now, the same on every rank: a stop
    signal, a dead launcher, train.max_time spent."""
    cfg, progress = state.cfg, state.progress
    images = cfg.train.log_every * cfg.train.batch_size
    budget = cfg.train.max_time_s
    over_time = budget is not None and state.clock.elapsed() >= budget
    rates = state.clock.lap(images)
    (requested, lost, over_time), record = state.telemetry.interval(
        rates, images, [stop_requested(), launcher_lost(), over_time],
        adversarial=cfg.adversarial and progress.step > cfg.train.pretrain_steps)
    count_skipped(state)  # the first read of the device, after the decision
    losses = {key: float(value) for key, value in outcome.logs.items() if value is not None}
    record = {"kind": "interval", "step": progress.step, "wall_s": round(state.clock.total(), 3), **record,
              "data_wait": rates["data_wait"], **losses,  # rank 0's share of time waiting (studies read it)
              "lr": state.generator_update.scheduler.get_last_lr()[0], "nonfinite": progress.nonfinite}
    state.accelerator.log(telemetry.tracker_scalars(record), step=progress.step)
    state.telemetry.write(record)
    state.bar.set_postfix(telemetry.status(record), refresh=False)
    if lost:
        return "launcher gone (a rank's parent process died)"
    if requested:
        return "stop requested"
    return f"train.max_time={cfg.train.max_time} spent" if over_time else None


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
