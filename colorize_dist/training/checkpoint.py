"""Checkpoints under RUN/checkpoints: `step-XXXXXXX/` (the last K) and `best/`, each written atomically.

A checkpoint is `accelerator.save_state`'s folder (models, optimizers, LR schedulers, grad scaler, the RNG
states of every rank, the EMA and the loop's `Progress`, or DeepSpeed's own files for each engine) plus
`manifest.json`, the size and SHA-256 of every file. Every rank saves into `.tmp-<name>/` (DeepSpeed's save
is a collective); after a barrier rank 0 writes the manifest and renames the folder into place. A folder
whose manifest is missing or does not match its files is not a checkpoint, so a crash mid-save never
leaves a half-written "latest", and `latest_valid` skips a corrupted one with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from colorize_dist.collectives import agree
from colorize_dist.errors import UserError
from colorize_dist.files import atomic_write, first_line, sha256_of

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
BEST = "best"
STEP_NAME = re.compile(r"step-(\d{7,})")


@dataclass
class Progress:
    """The loop's counters, saved in every checkpoint (registered with `accelerator.register_for_checkpointing`).

    The data position is counted in samples of the epoch, not in batches, so a run resumes at the same sample on
    any number of processes and with any split of the global batch into micro-batches."""

    step: int = 0  # optimizer steps taken, those whose updates were skipped for NaN/inf included
    epoch: int = 0  # the epoch the next step reads from
    sample: int = 0  # samples of that epoch read so far (by all ranks): where the next global batch starts
    images_seen: int = 0  # samples read in all (skipped steps' included), padding copies not
    nonfinite: int = 0  # steps in which an update was skipped for NaN/inf (or an fp16 overflow), in total
    nonfinite_in_a_row: int = 0
    best: float | None = None  # best validation value of train.best_metric so far
    wall_s: float = 0.0  # training time of every start of the run until this checkpoint

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "epoch" not in state:  # counted micro-batches per rank, which fit one number of processes only
            raise ValueError("it was written by an earlier version of colorize_dist that kept no data position in "
                             "samples")
        for name, value in state.items():
            setattr(self, name, value)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (a full disk); the message names the folder, the space and what survived."""


def save_checkpoint(accelerator: Accelerator, folder: Path, *, background: bool = False, keep: int | None = None,
                    **info: Any) -> None:
    """Save the full training state to `folder` atomically; call on every rank. `info` goes to the manifest; `keep`:
    then prune the step checkpoints to the `keep` newest (rank 0).

    The ranks wait for each other while they write their files (DeepSpeed's save is a collective). What follows is
    rank 0's alone: hashing every file into the manifest, the rename into place and pruning. With `background`,
    rank 0 does it in a thread while every rank trains on; the next save (or `wait_for_saves`) waits for it first,
    and a failure of it is raised there, on every rank. A kill meanwhile leaves `.tmp-<name>/`, which is no
    checkpoint: a resume takes the newest complete one, as after a kill during the write.

    A failed write (a full disk ends torch's zip writer with "unexpected pos") leaves no folder behind and raises
    on every rank alike, so no rank waits for the others forever.
    """
    previous_folder, previous_error = _take_pending(accelerator)
    temporary = folder.with_name(f".tmp-{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(temporary))
    except (OSError, RuntimeError) as exc:
        error = exc
    (failed,) = agree(error is not None or previous_error is not None)
    if failed:
        _raise_write_error(accelerator, previous_folder if previous_error else folder, temporary,
                           previous_error or error)
    if accelerator.is_main_process:
        if background:
            _pending[0] = (folder, _FINISHER.submit(_finish, temporary, folder, info, keep))
        else:
            error = _finish_quietly(temporary, folder, info, keep)
    if not background:
        (failed,) = agree(error is not None)
        if failed:
            _raise_write_error(accelerator, folder, temporary, error)


_FINISHER = ThreadPoolExecutor(1, thread_name_prefix="colorize-checkpoint")  # its thread is joined at exit
_pending: list[tuple[Path, Future] | None] = [None]  # rank 0's save being finished in the background


def _finish(temporary: Path, folder: Path, info: dict[str, Any], keep: int | None) -> None:
    """Rank 0: the manifest (size and SHA-256 of every file), the rename into place, pruning."""
    files = {path.relative_to(temporary).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
             for path in sorted(temporary.rglob("*")) if path.is_file()}
    atomic_write(temporary / MANIFEST, json.dumps({**info, "files": files}, indent=1))
    _replace(temporary, folder)
    if keep is not None:
        prune(folder.parent, keep)


def _finish_quietly(temporary: Path, folder: Path, info: dict[str, Any], keep: int | None) -> OSError | None:
    try:
        _finish(temporary, folder, info, keep)
    except OSError as exc:
        return exc
    return None


def _take_pending(accelerator: Accelerator) -> tuple[Path | None, OSError | None]:
    """Rank 0: wait for the save being finished in the background, if any: (its folder, its error or None)."""
    pending, _pending[0] = _pending[0], None
    if pending is None or not accelerator.is_main_process:
        return None, None
    folder, future = pending
    try:
        future.result()
    except OSError as exc:
        return folder, exc
    return folder, None


def wait_for_saves(accelerator: Accelerator) -> None:
    """Every rank: wait until rank 0 has finished the last background save; its failure raises on every rank."""
    folder, error = _take_pending(accelerator)
    (failed,) = agree(error is not None)
    if failed:
        folder = folder or Path("checkpoint")
        _raise_write_error(accelerator, folder, folder.with_name(f".tmp-{folder.name}"), error)


def _raise_write_error(accelerator: Accelerator, folder: Path, temporary: Path, error: BaseException | None) -> None:
    problem = _write_problem(folder, error)  # before cleaning up: the partial folder shows a full disk
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    if problem is None and error is not None:
        raise error
    raise CheckpointWriteError(problem or f"saving checkpoint {folder} failed on another rank; see its log")


def _write_problem(folder: Path, error: BaseException | None) -> str | None:
    """The one-line message when the disk is full; None for other failures."""
    root = folder.parent
    previous = latest_valid(root, verify_hashes=False)
    needed = sum(path.stat().st_size for path in previous.rglob("*")) if previous else 64 * 2**20
    free = shutil.disk_usage(root).free
    if error is None or not ((isinstance(error, OSError) and error.errno == errno.ENOSPC) or free < needed):
        return None
    kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"no space left on {root} to save checkpoint {folder.name} ({_size(free)} free, about {_size(needed)} "
            f"needed); free space or move the run dir, then rerun to resume; {kept}")


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def prune(root: Path, keep: int) -> list[Path]:
    """Keep the `keep` newest complete step checkpoints: delete older ones and leftovers of interrupted saves.

    Broken folders newer than those are left alone (a resumed run replaces them when it reaches their step), so a
    restart after a crash never deletes the checkpoints it just wrote. Sizes are checked, not hashes: pruning
    must not cost more than the save. Rank 0 only.
    """
    folders = step_checkpoints(root)
    kept = [folder for folder in folders if check(folder, verify_hashes=False) is None][-keep:]
    removed = sorted(root.glob(".tmp-*"))
    if kept:
        removed += [folder for folder in folders if folder not in kept and _step(folder) < _step(kept[0])]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def step_checkpoints(root: Path) -> list[Path]:
    """`step-*` folders under `root`, oldest first (valid or not)."""
    folders = [path for path in root.glob("step-*") if path.is_dir() and STEP_NAME.fullmatch(path.name)]
    return sorted(folders, key=_step)


def _step(folder: Path) -> int:
    return int(STEP_NAME.fullmatch(folder.name).group(1))


def latest_valid(root: Path, verify_hashes: bool = True) -> Path | None:
    """The newest step checkpoint whose files match its manifest; warns about each newer one skipped."""
    for folder in reversed(step_checkpoints(root)):
        problem = check(folder, verify_hashes)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def check(folder: Path, verify_hashes: bool = True) -> str | None:
    """None if `folder` is a complete checkpoint (every file of its manifest there, with its size and, unless
    told not to, its checksum), else what is wrong with it."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST} ({first_line(exc)})"
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"] or (verify_hashes and sha256_of(path) != expected["sha256"]):
            return f"{name} does not match its checksum (corrupted or partly written)"
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest `save_checkpoint` wrote; ValueError if it is not of that shape (hand-edited, another tool's)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    shaped = isinstance(manifest, dict) and isinstance(manifest.get("step"), int)
    if not (shaped and _is_file_table(manifest.get("files"))):
        raise ValueError('not a checkpoint manifest: expected {"step": int, "files": {name: {"size": int, '
                         '"sha256": str}, ...}}')
    return manifest


def _is_file_table(files: Any) -> bool:
    return isinstance(files, dict) and bool(files) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values())


def _replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted after."""
    aside = target.with_name(f".tmp-old-{target.name}")
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)
    source.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
