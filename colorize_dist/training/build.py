"""What the loop is made of: the Accelerator, each network with its optimizer and LR schedule, the data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, str_to_bool
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from colorize_dist.config import ConfigError
from colorize_dist.data import synth
from colorize_dist.data.loader import Batch, ColorLoader
from colorize_dist.data.make import ShardOptions
from colorize_dist.data.manifest import MANIFEST
from colorize_dist.training import peers
from colorize_dist.training.config import MIXED_PRECISION, Config, OptimConfig
from colorize_dist.training.update import Update

NETWORKS = ("generator", "discriminator")


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    """Accelerate owns devices, processes, precision and trackers; each network's update is update.py's.

    Under `accelerate launch` with a DeepSpeed config, each network gets its own DeepSpeed plugin (zero stage
    and offload from the launcher), so that each becomes its own engine; clipping and accumulation come from
    our config, never from DeepSpeed's "auto". train.collective_timeout_s bounds every collective; a gloo job that
    spans nodes gets the interface towards MASTER_ADDR unless GLOO_SOCKET_IFNAME is set (peers.py).
    """
    deepspeed_plugins, backend = None, None
    if str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        deepspeed_plugins = {
            name: DeepSpeedPlugin(gradient_accumulation_steps=cfg.train.grad_accum,
                                  gradient_clipping=cfg.optim.grad_clip)
            for name in NETWORKS
        }
        if not torch.cuda.is_available():  # Accelerate finds no backend for DeepSpeed on CPU; DeepSpeed's is gloo
            backend = "gloo"
    if not torch.cuda.is_available() or str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false")):
        peers.choose_gloo_interface()  # ConfigError (one line) when no interface reaches MASTER_ADDR
    accelerator = Accelerator(
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
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return torch.float32


def prepare_network(accelerator: Accelerator, name: str, model: nn.Module, cfg: Config, lr: float,
                    total_steps: int, micro_batch: int) -> tuple[nn.Module, Update]:
    """Adam and the LR schedule for `model`, everything handed to Accelerate (DDP, or a DeepSpeed engine), and the
    network's Update (update.py), which drives it.

    DeepSpeed: `gradient_clipping` is always written, 0.0 included: a config without it clips at DeepSpeed's
    default of 1.0. DDP: the discriminator runs two forward passes (real, fake) before its backward, so it does not
    broadcast buffers (a BatchNorm's running statistics) from rank 0 in each forward: that in-place write would
    invalidate the first pass's graph. D is never evaluated, so each rank's running statistics go unused;
    normalisation in training uses each rank's micro-batch statistics, as DDP does without SyncBatchNorm.
    fp16 without DeepSpeed: the network gets its own GradScaler (checkpointed by the loop).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay)
    scheduler = build_schedule(optimizer, cfg.optim, total_steps)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        accelerator.state.select_deepspeed_plugin(name)
        accelerator.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=micro_batch,
            train_batch_size=micro_batch * cfg.train.grad_accum * accelerator.num_processes,
            gradient_clipping=cfg.optim.grad_clip,
        )
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
