"""What the loop is made of, and checked before its first step: the Accelerator, the data, each network with its
optimizer and LR schedule, the resumed checkpoint (`setup` makes the loop's `State`)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed, str_to_bool
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from tqdm import tqdm

from colorize_dist import collectives, devices
from colorize_dist.config import ConfigError, save_config
from colorize_dist.data import synth
from colorize_dist.data.loader import Batch, ColorLoader, build_loader, dali_available, first_batch
from colorize_dist.data.manifest import MANIFEST
from colorize_dist.data.options import ShardOptions
from colorize_dist.data.store import redact
from colorize_dist.eval.fid import load_inception
from colorize_dist.models import DiscriminatorLoss, GeneratorLoss, build_discriminator, build_generator
from colorize_dist.models.export import init_from_export
from colorize_dist.training import elastic, peers
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import (
    MIXED_PRECISION,
    Config,
    OptimConfig,
    check_launch,
    flat_config,
    load_training_config,
    recorded_config,
)
from colorize_dist.training.costs import peak_flops, point_cost
from colorize_dist.training.divergence import DivergenceWatch
from colorize_dist.training.ema import EMA
from colorize_dist.training.profile import ProfileWindow
from colorize_dist.training.resume import check_resume, find_resume, load_resume
from colorize_dist.training.summary import Clock, device_name
from colorize_dist.training.telemetry import Telemetry
from colorize_dist.training.update import SkippedSteps, Update

log = logging.getLogger(__name__)

NETWORKS = ("generator", "discriminator")


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
    skipped: SkippedSteps  # steps with a skipped update, tallied on the device
    total_steps: int
    memory_format: torch.memory_format
    batches: Iterator[Batch]
    clock: Clock
    telemetry: Telemetry
    profile: ProfileWindow | None  # train.profile's window, None when off
    bar: tqdm
    divergence: DivergenceWatch
    metrics: dict[str, float] = field(default_factory=dict)
    checkpointed_step: int = 0  # the newest step checkpoint's (at first, the resumed one's)
    stopped: str | None = None  # why the run stopped early (resumable), if it did
    done: bool = False

    @property
    def networks(self) -> list[nn.Module]:
        return [net for net in (self.generator, self.discriminator) if net is not None]


def setup(accelerator: Accelerator, cfg: Config, run_dir: Path, resume: str) -> State:
    """Data, losses, networks, optimizers and schedules, the resumed checkpoint; checked before the first step."""
    micro_batch = check_launch(cfg.train, accelerator.num_processes)
    device, main_process = accelerator.device, accelerator.is_main_process
    if cfg.data.shards is None:
        cfg.data.shards = str(synthetic_shards(accelerator, run_dir, cfg.train.synth_images, cfg.data.resolution))
    if main_process:  # a record of the run: credentials in a shard URL are not written down
        warn_if_config_changed(recorded_config(cfg), run_dir / "config.yaml")
        save_config(recorded_config(cfg), run_dir / "config.yaml")

    # Data: every rank reads its share of each global batch; the order depends on (seed, epoch) only. A shard
    # server that stops answering is agreed on by every rank, which then stop together (loop.py `stop_for_outage`).
    ranks = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "device": device}
    loader = build_loader(cfg.data, "train", batch_size=micro_batch, global_batch=cfg.train.batch_size,
                          seed=cfg.train.seed, dtype=input_dtype(accelerator), publish_outages=False, **ranks)
    val_loader = build_loader(cfg.data, "val", batch_size=micro_batch, publish_outages=False, **ranks)
    sample_batch = (first_batch(cfg.data, "val", batch_size=cfg.train.num_samples, device=device)  # loader closed
                    if main_process else None)
    accelerator.print(f"data: {loader.describe()}")
    check_inputs(cfg, loader, val_loader, device)

    # Losses first: a perceptual loss without VGG weights fails here, not an hour in.
    generator_loss = GeneratorLoss(cfg.loss, cfg.model.generator.color_space, half_precision(accelerator)).to(device)
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
    if main_process and (report := elastic.restart_report(run_dir, progress.step, accelerator.num_processes)):
        print(f"train: {report}", flush=True)  # after a loss of ranks: who, the new size, the steps lost
    accelerator.init_trackers("colorize", config=flat_config(recorded_config(cfg)))

    clock = Clock(progress.wall_s)
    peak = (cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops
            else peak_flops(device_name(device), accelerator.mixed_precision) if device.type == "cuda" else None)
    watched = Telemetry(run_dir, device, rank=accelerator.process_index, world_size=accelerator.num_processes,
                        forward_modules=[net for net in (generator, discriminator) if net is not None],
                        cost=point_cost(cfg) if peak else None, peak_flops=peak,  # no MFU without a peak
                        straggler_margin=cfg.train.straggler_margin, straggler_intervals=cfg.train.straggler_intervals)
    return State(
        accelerator=accelerator, cfg=cfg, run_dir=run_dir, loader=loader, val_loader=val_loader,
        sample_batch=sample_batch, generator=generator, discriminator=discriminator,
        bare_generator=accelerator.unwrap_model(generator, keep_torch_compile=False),
        bare_discriminator=(accelerator.unwrap_model(discriminator, keep_torch_compile=False)
                            if discriminator is not None else None),
        generator_update=generator_update, discriminator_update=discriminator_update, generator_loss=generator_loss,
        discriminator_loss=discriminator_loss, ema=ema, progress=progress, checkpointed_step=progress.step,
        skipped=SkippedSteps(device, progress.nonfinite_in_a_row), total_steps=total_steps,
        memory_format=memory_format, batches=clock.wait(endless(loader, progress.epoch, progress.sample)),
        clock=clock, telemetry=watched, done=progress.step >= total_steps,
        divergence=DivergenceWatch(cfg.optim.lr, cfg.train.pretrain_steps if cfg.adversarial else 0),
        profile=(ProfileWindow(cfg.train.profile, run_dir, accelerator.process_index, device)
                 if cfg.train.profile is not None else None),
        bar=tqdm(total=total_steps, initial=progress.step, unit="step", disable=not main_process, dynamic_ncols=True))


def check_inputs(cfg: Config, loader: ColorLoader, val_loader: ColorLoader, device: torch.device) -> None:
    """What would otherwise fail hours in, or silently: checked before the first step."""
    if cfg.train.batch_size > loader.samples:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split "
                          f"({loader.samples} images in {redact(cfg.data.shards)}); lower train.batch_size or add "
                          "images")
    if cfg.train.fid_weights is not None:
        load_inception(cfg.train.fid_weights, device)  # missing: FileNotFoundError naming it; cached for validation
    if "wandb" in cfg.train.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.trackers names wandb, which is not installed: pip install wandb, or drop it")


def warn_if_config_changed(cfg: Config, saved: Path) -> None:
    """A run directory reused with other settings is usually a mistake (or a deliberate extension): say which."""
    if not saved.is_file():
        return
    before = flat_config(load_training_config(saved))
    changed = sorted(key for key, value in flat_config(cfg).items() if before.get(key) != value)
    if changed:
        log.warning("%s: settings differ from the previous run in this directory: %s", saved, ", ".join(changed))


def remaining_steps(cfg: Config, loader: ColorLoader, progress: Progress) -> int:
    """Optimizer steps left to the end of train.epochs from the resumed data position, at this run's batch."""
    if progress.epoch >= cfg.train.epochs:
        return 0
    return (loader.layout.steps(loader.samples, progress.sample)
            + (cfg.train.epochs - progress.epoch - 1) * loader.steps_per_epoch)


def build_accelerator(cfg: Config, run_dir: Path, cpu: bool = False) -> Accelerator:
    """Accelerate owns devices, processes, precision and trackers; each network's update is update.py's.

    Under `accelerate launch` with a DeepSpeed config, each network gets its own DeepSpeed plugin (zero stage
    and offload from the launcher), so that each becomes its own engine; clipping and accumulation come from
    our config, never from DeepSpeed's "auto". train.collective_timeout_s bounds every collective. Every job has a
    gloo group (the main one, or the control group beside NCCL: collectives.py); one that spans nodes gets the
    interface towards MASTER_ADDR unless GLOO_SOCKET_IFNAME is set (peers.py). The node is checked first
    (devices.py): a job given GPUs trains on one, each rank on its own, or ends in one line; `cpu` trains on the
    CPU even so.
    """
    uses_dali = cfg.data.backend == "dali" or (cfg.data.backend == "auto" and dali_available())
    devices.check_node(cpu=cpu, uses_dali=uses_dali)
    deepspeed_plugins, backend = None, None
    if str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        deepspeed_plugins = {
            name: DeepSpeedPlugin(gradient_accumulation_steps=cfg.train.grad_accum,
                                  gradient_clipping=cfg.optim.grad_clip)
            for name in NETWORKS
        }
        if not torch.cuda.is_available():  # Accelerate finds no backend for DeepSpeed on CPU; DeepSpeed's is gloo
            backend = "gloo"
    peers.choose_gloo_interface()  # ConfigError (one line) when no interface reaches MASTER_ADDR
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=MIXED_PRECISION.get(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        deepspeed_plugins=deepspeed_plugins,
        log_with=cfg.train.trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dynamo_backend="inductor" if cfg.train.compile else "no",
        kwargs_handlers=[process_group_kwargs(cfg, backend)],
        # LR schedules count optimizer steps; by default Accelerate steps them once per process per step.
        step_scheduler_with_optimizer=False,
    )
    check_backend(accelerator)
    collectives.open_control_group(timedelta(seconds=cfg.train.collective_timeout_s))
    return accelerator


def check_backend(accelerator: Accelerator) -> None:
    """Refuse, in one line, what would otherwise run other than asked."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.mixed_precision == "fp16" and not deepspeed and accelerator.scaler is None:
        raise ConfigError(f"train.mixed_precision=fp16 needs a GPU: on {accelerator.device.type} Accelerate would "
                          "silently train in fp32; use bf16 or fp32")
    if deepspeed and any(plugin.zero_stage == 3 for plugin in accelerator.state.deepspeed_plugins.values()):
        raise ConfigError("DeepSpeed ZeRO-3 is not supported (the generator's loss scores its output with the "
                          "discriminator's full weights); use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)")


def process_group_kwargs(cfg: Config, backend: str | None) -> InitProcessGroupKwargs:
    """The process group's backend (None: Accelerate's choice) and timeout: train.collective_timeout_s."""
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    # Accelerate passes on only values that differ from InitProcessGroupKwargs' defaults (600 s): 600 s would be
    # dropped, and gloo would wait torch's default of 30 minutes. A microsecond more keeps it.
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += timedelta(microseconds=1)
    return InitProcessGroupKwargs(backend=backend, timeout=timeout)


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """What the networks take in: DeepSpeed's fp16/bf16 engines hold half-precision weights and do not cast
    inputs; elsewhere autocast does, and inputs stay float32."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return half_precision(accelerator) or torch.float32
    return torch.float32


def half_precision(accelerator: Accelerator) -> torch.dtype | None:
    """The run's fp16 or bf16 as a dtype; None: fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def prepare_network(accelerator: Accelerator, name: str, model: nn.Module, cfg: Config, lr: float,
                    total_steps: int, micro_batch: int) -> tuple[nn.Module, Update]:
    """Adam and the LR schedule for `model`, everything handed to Accelerate (DDP, or a DeepSpeed engine), and the
    network's Update (update.py), which drives it.

    DeepSpeed: `gradient_clipping` is always written, 0.0 included: a config without it clips at DeepSpeed's
    default of 1.0. DDP: the discriminator runs two forward passes (real, fake) before its backward, so it does not
    broadcast buffers (a BatchNorm's running statistics) from rank 0 in each forward: that in-place write would
    invalidate the first pass's graph. D is never evaluated, so each rank's running statistics go unused;
    normalisation in training uses each rank's micro-batch statistics, as DDP does without SyncBatchNorm.
    fp16 without DeepSpeed: the network gets its own GradScaler (checkpointed by the loop). Without DeepSpeed, Adam
    is the fused one: it takes the skip decision on the device (update.py); DeepSpeed's engines step it themselves.
    """
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay, fused=not deepspeed)
    scheduler = build_schedule(optimizer, cfg.optim, total_steps)
    if deepspeed:
        accelerator.state.select_deepspeed_plugin(name)
        accelerator.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_batch,
            train_batch_size=micro_batch * cfg.train.grad_accum * accelerator.num_processes,
            gradient_clipping=cfg.optim.grad_clip,
        )
    with devices.libraries_on(accelerator.device):  # a rank bound to one GPU: DeepSpeed and DDP get it
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper, if compiled
    if name == "discriminator" and isinstance(ddp, nn.parallel.DistributedDataParallel):
        ddp.broadcast_buffers = False  # read at every forward (torch ≥ 2.15: forward_sync_buffers)
    scaler = torch.amp.GradScaler(accelerator.device.type) if accelerator.scaler is not None else None
    return model, Update(model, optimizer, scheduler, grad_clip=cfg.optim.grad_clip,
                         accumulation=cfg.train.grad_accum, deepspeed=deepspeed, scaler=scaler)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LRScheduler:
    """The LR over optimizer steps: a linear warm-up from lr / warmup_steps, then constant, or linear or cosine
    decay to 0 at `total_steps`."""
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    decay = {"constant": lambda: ConstantLR(optimizer, factor=1.0, total_iters=0),
             "linear": lambda: LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=decay_steps),
             "cosine": lambda: CosineAnnealingLR(optimizer, T_max=decay_steps)}[cfg.schedule]()
    if cfg.warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=1 / cfg.warmup_steps, end_factor=1.0,
                      total_iters=max(1, cfg.warmup_steps - 1))
    return SequentialLR(optimizer, [warmup, decay], milestones=[cfg.warmup_steps])


def stretch_schedule(scheduler: LRScheduler, cfg: OptimConfig, total_steps: int) -> None:
    """Make a (resumed) schedule's decay end at `total_steps`: the schedulers go on from the current LR, so a run
    whose length changed at resume (another global batch, more epochs) decays smoothly to its new last step."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
    decay = scheduler._schedulers[-1] if isinstance(scheduler, SequentialLR) else scheduler
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if isinstance(decay, CosineAnnealingLR):
        decay.T_max = decay_steps
    elif isinstance(decay, LinearLR) and cfg.schedule == "linear":
        decay.total_iters = decay_steps


def synthetic_shards(accelerator: Accelerator, run_dir: Path, images: int, resolution: int) -> Path:
    """The embedded default's data: `images` synthetic images as shards in RUN/synthetic (made once, by rank 0)."""
    out = run_dir / "synthetic"
    if accelerator.is_main_process and not (out / MANIFEST).is_file():
        options = ShardOptions(image_format="png", shard_size=500, val_fraction=0.1, workers=1, force=True)
        synth.write_synthetic_shards(out, images, resolution, options=options)
    accelerator.wait_for_everyone()
    return out


def endless(loader: ColorLoader, epoch: int, start: int) -> Iterator[Batch]:
    """Training micro-batches from sample `start` of `epoch` on, epoch after epoch."""
    while True:
        yield from loader.epoch(epoch, start)
        epoch, start = epoch + 1, 0
