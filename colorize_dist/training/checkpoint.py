"""Checkpoints under RUN/checkpoints: `step-XXXXXXX/` (the last K) and `best/`, each written atomically.

A checkpoint is `accelerator.save_state`'s folder (models, optimizers, LR schedulers, grad scaler, the RNG
states of every rank, the EMA and the loop's `Progress`, or DeepSpeed's own files for each engine) plus
`manifest.json`, the size and SHA-256 of every file. Every rank saves into `.tmp-<name>/` (DeepSpeed's save
is a collective); after a barrier rank 0 writes the manifest and renames the folder into place. A folder
whose manifest is missing or does not match its files is not a checkpoint, so a crash mid-save never
leaves a half-written "latest", and `latest_valid` skips a corrupted one with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from colorize_dist.files import first_line

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
BEST = "best"
STEP_NAME = re.compile(r"step-(\d{7,})")


@dataclass
class Progress:
    """The loop's counters, saved in every checkpoint (registered with `accelerator.register_for_checkpointing`)."""

    step: int = 0  # optimizer steps taken
    batches: int = 0  # micro-batches consumed per rank: the data loader's position
    nonfinite: int = 0  # micro-batches skipped for a NaN/inf loss, in total
    nonfinite_in_a_row: int = 0
    best: float | None = None  # best validation value of train.best_metric so far

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(accelerator: Accelerator, folder: Path, **info: Any) -> None:
    """Save the full training state to `folder` atomically; call on every rank. `info` goes to the manifest."""
    temporary = folder.with_name(f".tmp-{folder.name}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {path.relative_to(temporary).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
                 for path in sorted(temporary.rglob("*")) if path.is_file()}
        (temporary / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=1))
        _replace(temporary, folder)
    accelerator.wait_for_everyone()


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step checkpoints (and leftovers of interrupted saves); rank 0 only."""
    removed = [*sorted(root.glob(".tmp-*")), *step_checkpoints(root)[:-keep]]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def step_checkpoints(root: Path) -> list[Path]:
    """`step-*` folders under `root`, oldest first (valid or not)."""
    folders = [path for path in root.glob("step-*") if path.is_dir() and STEP_NAME.fullmatch(path.name)]
    return sorted(folders, key=lambda path: int(STEP_NAME.fullmatch(path.name).group(1)))


def latest_valid(root: Path) -> Path | None:
    """The newest step checkpoint whose files match its manifest; warns about each newer one skipped."""
    for folder in reversed(step_checkpoints(root)):
        problem = check(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def check(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint, else what is wrong with it."""
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
        if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
