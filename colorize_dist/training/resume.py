"""Resuming a run: which checkpoint, whether this launch may continue it, and loading it on any number of processes.

What a resume accepts, and what it does:
- Another number of processes or nodes, with the same global batch (train.batch_size): a DDP checkpoint holds
  whole weights and optimizer states and loads as it is. A DeepSpeed ZeRO-1/2 checkpoint partitions its optimizer
  states by rank, so it is first converted to DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`,
  into a temporary folder beside it, removed after loading; the checkpoint itself is not touched) and loaded from
  there. The data goes on at the same sample of the same epoch (see `data.sharding`), and each step's random numbers
  come from (seed, the step's place in the data, rank), so the run continues as one started on the new number of
  processes from that checkpoint would.
- Another split of the same global batch (train.grad_accum, or the processes): continues at exactly that sample.
- Another global batch: refused in one line, unless train.allow_batch_change=true; then it continues at the same
  sample, the remaining epochs take as many steps as the new batch needs, and the LR schedule's decay is stretched
  or shrunk to end at the new last step (optim.lr itself is not rescaled: set it if you want the linear rule).
- Another model: refused in one line (the weights do not fit).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from colorize_dist.collectives import broadcast_from_rank0
from colorize_dist.config import ConfigError
from colorize_dist.files import first_line
from colorize_dist.training import checkpoint
from colorize_dist.training.config import Config

UNIVERSAL_PREFIX = ".tmp-universal-"  # a `.tmp-*` folder: `checkpoint.prune` removes one a crash left behind
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    step: int
    world_size: int | None  # processes it was saved by; None in checkpoints that did not record it
    global_batch: int | None  # train.batch_size it was trained with; likewise


def find_resume(accelerator: Accelerator, run_dir: Path, resume: str) -> ResumePoint | None:
    """The checkpoint to resume from, chosen by rank 0 (which checks files and checksums) for every rank.

    With --resume auto and checkpoints that are all damaged, the run is refused rather than restarted from step 0:
    training afresh would replace them one by one as it reaches their steps, and one may still be restorable."""
    choice: list[ResumePoint | str | None] = [None, None]  # checkpoint, the one line refusing the request
    root = run_dir / checkpoint.CHECKPOINTS
    if accelerator.is_main_process and resume != "none":
        folder = checkpoint.latest_valid(root) if resume == "auto" else Path(resume)
        problem = None if folder is None or resume == "auto" else _not_a_checkpoint(folder) or checkpoint.check(folder)
        if folder is not None and problem is None:
            manifest = checkpoint.read_manifest(folder)
            choice = [ResumePoint(folder, manifest["step"], manifest.get("world_size"), manifest.get("global_batch")),
                      None]
        elif problem is not None:
            choice = [None, f"--resume {resume}: not a usable checkpoint: {problem}"]
        elif damaged := checkpoint.step_checkpoints(root):
            best = root / checkpoint.BEST
            other = f"resume from --resume {best}, " if best.is_dir() and checkpoint.check(best) is None else ""
            choice = [None, f"--resume auto: all {len(damaged)} step checkpoints in {root} are damaged (newest "
                            f"{damaged[-1].name}: {checkpoint.check(damaged[-1])}; see the warnings above); restore "
                            f"one, {other}or start afresh with --resume none"]
    elif accelerator.is_main_process and checkpoint.step_checkpoints(root):
        accelerator.print(f"resume: none (--resume none): training starts afresh at step 0; the checkpoints in {root} "
                          "are replaced as the run reaches their steps")
    point, problem = broadcast_from_rank0(choice)
    if problem is not None:  # raised on every rank alike
        raise ConfigError(problem)
    return point


def _not_a_checkpoint(folder: Path) -> str | None:
    """What --resume names instead of a checkpoint folder: nothing, a file, a run folder or its checkpoints folder."""
    if not folder.exists():
        return f"{folder} does not exist; pass a checkpoint folder (RUN/checkpoints/step-NNNNNNN or best), auto or none"
    if not folder.is_dir():
        return f"{folder} is a file; pass a checkpoint folder (RUN/checkpoints/step-NNNNNNN or best)"
    if (folder / checkpoint.MANIFEST).exists():
        return None  # a checkpoint: `checkpoint.check` says whether it is complete
    if (folder / checkpoint.CHECKPOINTS).is_dir():
        what, root = "a run folder", folder / checkpoint.CHECKPOINTS
    elif checkpoint.step_checkpoints(folder):
        what, root = "the checkpoints folder of a run", folder
    else:
        return None
    newest = checkpoint.latest_valid(root, verify_hashes=False)
    one = f"e.g. --resume {newest}" if newest else "it holds no complete checkpoint yet"
    return (f"{folder} is {what}, not a checkpoint; continue the run with --run-dir {root.parent} --resume auto, or "
            f"name one of its checkpoints ({one})")


def check_resume(point: ResumePoint, cfg: Config, accelerator: Accelerator) -> None:
    """Refuse, in one line, a resume that would silently change the run; say what changed otherwise."""
    saved, asked = point.global_batch, cfg.train.batch_size
    if saved is not None and saved != asked and not cfg.train.allow_batch_change:
        raise ConfigError(f"checkpoint {point.folder} was trained with train.batch_size={saved}, this run asks for "
                          f"{asked}: set train.allow_batch_change=true to continue at the same sample with the new "
                          f"batch (the LR schedule is re-spread over the remaining steps; optim.lr is not rescaled), "
                          f"or resume with train.batch_size={saved}")
    if saved is not None and saved != asked:
        accelerator.print(f"resume: the global batch changes from {saved} to {asked} (train.allow_batch_change)")
    if point.world_size is not None and point.world_size != accelerator.num_processes:
        accelerator.print(f"resume: {point.folder} was saved by {point.world_size} processes, this run has "
                          f"{accelerator.num_processes}; the global batch of {asked} is now "
                          f"{accelerator.num_processes} × {asked // accelerator.num_processes // cfg.train.grad_accum}"
                          f" × {cfg.train.grad_accum} (processes × micro-batch × train.grad_accum)")


def load_resume(accelerator: Accelerator, point: ResumePoint, networks: list[nn.Module]) -> None:
    """Load everything `accelerator` tracks from `point`, converting a ZeRO checkpoint saved by another number of
    processes first; a checkpoint that does not fit is one line on every rank."""
    folder = point.folder
    engines = networks if accelerator.distributed_type == DistributedType.DEEPSPEED else []
    if (problem := _other_backend(point, engines)) is not None:
        raise ConfigError(problem)
    partitioned = any(engine.zero_optimization_stage() > 0 for engine in engines)
    convert = partitioned and point.world_size not in (None, accelerator.num_processes)
    if convert:
        folder = _universal_copy(accelerator, point)
        for engine in engines:
            engine._config.load_universal_checkpoint = True  # read at load time (DeepSpeedEngine.load_checkpoint)
    try:
        accelerator.load_state(str(folder))
    except (RuntimeError, KeyError, ValueError, AssertionError, *_zero_errors(engines)) as exc:  # another model
        raise ConfigError(f"checkpoint {point.folder} does not fit this config ({first_line(exc)}); resume with the "
                          "config it was saved with, or start afresh with --resume none or another --run-dir") from None
    finally:
        if convert:
            for engine in engines:
                engine._config.load_universal_checkpoint = False
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)


def _other_backend(point: ResumePoint, engines: list[nn.Module]) -> str | None:
    """The one line for a checkpoint saved with DeepSpeed resumed without it, or the other way round: neither
    loads the other's files (DeepSpeed fails on an assertion that names nothing)."""
    saved_by_deepspeed = any((entry / DEEPSPEED_MODEL_STATES).is_file() for entry in point.folder.iterdir())
    afresh = "or start afresh with --resume none or another --run-dir"
    if engines and not saved_by_deepspeed:
        stage = engines[0].zero_optimization_stage()
        return (f"checkpoint {point.folder} was saved without DeepSpeed (DDP or one process) and this run uses "
                f"DeepSpeed ZeRO-{stage}, which loads only DeepSpeed checkpoints; resume it with the accelerate "
                f"config it was saved with (not a configs/accelerate/deepspeed_*.yaml), {afresh}")
    if saved_by_deepspeed and not engines:
        return (f"checkpoint {point.folder} was saved by DeepSpeed and this run does not use it; resume it with the "
                f"DeepSpeed accelerate config it was saved with (configs/accelerate/deepspeed_*.yaml), {afresh}")
    return None


def _zero_errors(engines: list[nn.Module]) -> tuple[type[Exception], ...]:
    """What DeepSpeed raises for a ZeRO checkpoint it cannot load (its own exception type, not a RuntimeError)."""
    if not engines:
        return ()
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    return (ZeRORuntimeException,)


def _universal_copy(accelerator: Accelerator, point: ResumePoint) -> Path:
    """A copy of `point` whose DeepSpeed folders are in the universal format (rank 0 converts; every rank waits)."""
    target = point.folder.with_name(f"{UNIVERSAL_PREFIX}{point.folder.name}")
    problem = None
    if accelerator.is_main_process:
        accelerator.print(f"resume: converting the DeepSpeed ZeRO states of {point.folder} (saved by "
                          f"{point.world_size} processes) to the universal format for {accelerator.num_processes}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for entry in sorted(point.folder.iterdir()):
            if not (entry / DEEPSPEED_MODEL_STATES).is_file():
                os.symlink(entry.resolve(), target / entry.name)
                continue
            result = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(entry),
                 "--output_folder", str(target / entry.name), "--inject_missing_state", "--num_extract_workers", "1",
                 "--num_merge_workers", "1"], capture_output=True, text=True)
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                problem = (f"converting {entry} to DeepSpeed's universal checkpoint failed "
                           f"({lines[-1] if lines else f'status {result.returncode}'}); resume on "
                           f"{point.world_size} processes, as it was saved")
                shutil.rmtree(target, ignore_errors=True)
                break
    (problem,) = broadcast_from_rank0([problem])
    if problem is not None:
        raise ConfigError(problem)
    return target
