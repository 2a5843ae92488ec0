"""What is due at some steps of the loop: validation and the choice of the best checkpoint, the step checkpoints
(refused when the weights went NaN/inf), the sample grids."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from colorize_dist.collectives import any_rank
from colorize_dist.data.store import redact
from colorize_dist.errors import UserError
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.models.export import save_generator
from colorize_dist.training import checkpoint
from colorize_dist.training.build import State
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import Config

log = logging.getLogger(__name__)

FEW_VALIDATION_IMAGES = 100  # below: the choice of the best checkpoint is warned about


class NonFiniteLossError(UserError, RuntimeError):
    """Too many NaN/inf losses in a row, or NaN/inf weights; the message says where and what to try."""

    exit_status = 1  # not a usage error: the run diverged (its last good checkpoint stays)


def validate(state: State) -> dict[str, float]:
    """Metrics of the EMA generator on the validation split (every rank); a new best is checkpointed and exported."""
    accelerator, cfg, progress = state.accelerator, state.cfg, state.progress
    metrics = compute_metrics(state.ema.model, state.val_loader, device=accelerator.device,
                              fid_weights=cfg.train.fid_weights)
    scores = {f"val/{name}": value for name, value in metrics.items()}
    accelerator.log(scores, step=progress.step)
    state.telemetry.write({"kind": "validation", "step": progress.step, **scores})
    if (worse := state.divergence.validation(progress.step, metrics)) is not None:  # NaN: DivergedError
        log.warning(worse)
    value = metrics[cfg.train.best_metric]
    if improves(value, progress.best, cfg.train.best_mode):
        if progress.best is None and state.val_loader.samples < FEW_VALIDATION_IMAGES:
            log.warning("the best checkpoint (train.best_metric) and its export are chosen on the %d images of the "
                        "validation split of %s, so few that the choice is mostly noise; make the set with a "
                        "larger --val-fraction", state.val_loader.samples, redact(cfg.data.shards))
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


def save_step_checkpoint(accelerator: Accelerator, cfg: Config, root: Path, progress: Progress,
                         *modules: nn.Module) -> None:
    """The step checkpoint, unless the weights of `modules` went NaN/inf (e.g. an LR far too high): a poisoned
    checkpoint would be resumed from, so the run stops and the last good one stays the newest."""
    finite = torch.stack([param.detach().isfinite().all() for module in modules for param in module.parameters()])
    (poisoned,) = any_rank(~finite.all(), device=accelerator.device)
    if poisoned:
        checkpoint.wait_for_saves(accelerator)  # the last good one complete before it is named
        raise NonFiniteLossError(
            f"the weights became NaN/inf by step {progress.step} and were not checkpointed; the last good checkpoint "
            f"is {checkpoint.latest_valid(root, verify_hashes=False) or 'none (start afresh)'}. Try a lower "
            "optim.lr, optim.grad_clip > 0, or bf16 instead of fp16")
    save_checkpoint(accelerator, cfg, root / checkpoint.step_name(progress.step), progress,
                    keep=cfg.train.keep_checkpoints)


def save_checkpoint(accelerator: Accelerator, cfg: Config, folder: Path, progress: Progress, *,
                    keep: int | None = None, **info: float) -> None:
    """`checkpoint.save_checkpoint` with what a resume checks (the processes and the global batch), hashed, renamed
    into place and pruned (`keep`) in the background on rank 0 (`finish` waits for it)."""
    checkpoint.save_checkpoint(accelerator, folder, background=True, keep=keep, step=progress.step,
                               world_size=accelerator.num_processes, global_batch=cfg.train.batch_size, **info)


def write_samples(accelerator: Accelerator, ema: nn.Module, batch, color_space: str, folder: Path,
                  step: int) -> None:
    """The sample grid as RUN/samples/step-XXXXXXX.png and in TensorBoard (rank 0)."""
    grid = sample_grid(ema, batch, color_space)
    save_grid(grid, folder / f"{checkpoint.step_name(step)}.png")
    if any(tracker.name == "tensorboard" for tracker in accelerator.trackers):
        accelerator.get_tracker("tensorboard").log_images({"samples": grid[None]}, step=step)
