"""Adopt shards written by other tools (webdataset.ShardWriter, GNU tar): the manifest and DALI indexes the loaders
need.

Hashes are taken from the bytes as they are now, so indexing vouches for nothing about their origin. A folder an
interrupted `shards make` left is refused, because its complete shards are only part of the set.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from colorize_dist.data.dali_index import dali_index, write_index
from colorize_dist.data.manifest import (
    MAKE_PLAN,
    MANIFEST,
    SPLITS,
    ManifestError,
    MissingShardsError,
    Shard,
    interrupted_make,
    manifest_shards,
    read_manifest,
    shard_record,
    write_manifest,
)
from colorize_dist.data.options import ShardError
from colorize_dist.files import atomic_write

KEPT_INFO = ("source", "resolution", "image_format", "val_fraction", "split_rule", "sample_order", "jpeg_quality",
             "grayscale", "min_size", "background", "transparent_on_background", "skipped", "review", "contact_sheet")


def index_shards(directory: Path, *, force: bool = False) -> dict[str, Any]:
    """Write a DALI index beside every tar of `directory`/{train,val} and the manifest; returns the manifest."""
    previous: dict[str, Any] = {}
    interrupted = interrupted_make(directory)
    if interrupted is not None and not force:
        raise ShardError(f"{interrupted}, or pass --force to index the complete shards alone")
    if (directory / MANIFEST).exists():
        if not force:
            raise ShardError(f"{directory / MANIFEST} exists; pass --force to replace it, or --repair to rewrite "
                             "missing or stale .idx files")
        try:
            previous = read_manifest(directory)
        except (ManifestError, MissingShardsError):
            previous = {}
    tars = {split: sorted((directory / split).glob("*.tar")) for split in SPLITS}
    if not any(tars.values()):
        raise ShardError(f"no tar shards in {directory / 'train'} or {directory / 'val'}")
    shards = {}
    for split, paths in tars.items():
        shards[split] = []
        for path in tqdm(paths, desc=f"index {split}", unit="shard"):
            try:
                shards[split].append(shard_record(path, write_index(path)))
            except (tarfile.TarError, OSError) as exc:
                raise ShardError(f"{path} is not a readable tar ({exc})") from None
    info = {key: previous[key] for key in KEPT_INFO if key in previous}
    info = info or {"source": "indexed by `colorize-dist shards index`", "resolution": None,
                    "image_format": "as stored", "split_rule": "train/ and val/ folders"}
    if "mean_ab" in previous and all(_same_shards(previous, split, shards[split]) for split in SPLITS):
        info["mean_ab"] = previous["mean_ab"]  # the card's mean-ab baseline holds while the bytes are the same
    manifest = write_manifest(directory, shards, **info)
    if interrupted is not None:  # adopted with --force: what the make left unfinished goes
        partial = [path for split in SPLITS for path in (directory / split).glob("*.partial")]
        for path in [directory / MAKE_PLAN, *partial]:
            path.unlink(missing_ok=True)
    images = sum(split["samples"] for split in manifest["splits"].values())
    recorded = sum(split["samples"] for split in previous.get("splits", {}).values())
    if interrupted is not None:
        print(f"note: adopted the {images} images of an unfinished `shards make` (--force); its plan and unfinished "
              "shards were removed", file=sys.stderr)
    elif images < recorded:
        print(f"note: adopted {images} images (--force); the previous {MANIFEST} listed {recorded}", file=sys.stderr)
    return manifest


def _same_shards(previous: dict[str, Any], split: str, shards: list[Shard]) -> bool:
    recorded = previous.get("splits", {}).get(split, {}).get("shards", [])
    return [entry.get("sha256") for entry in recorded] == [shard.sha256 for shard in shards]


def repair_indexes(directory: Path) -> list[Path]:
    """Rewrite the `.idx` of each listed shard whose index is missing or stale and whose bytes match the manifest
    (size, and SHA-256 where recorded); returns the files rewritten. Raises ShardError for a shard that changed."""
    manifest = read_manifest(directory)
    repaired = []
    for split in manifest["splits"]:
        for shard in manifest_shards(directory, manifest, split):
            if not shard.path.is_file():
                raise ShardError(f"shard {shard.path} is missing; restore it or remake the set")
            if shard.size is not None and shard.path.stat().st_size != shard.size:
                raise ShardError(f"shard {shard.path} is not the size {MANIFEST} records; its index is not "
                                 "rewritten: remake the set or restore the shard")
            try:
                text = dali_index(shard.path)
            except (tarfile.TarError, OSError) as exc:
                raise ShardError(f"{shard.path} is not a readable tar ({exc}); remake the set") from None
            if shard.index_path.is_file() and shard.index_path.read_text() == text:
                continue
            record = shard_record(shard.path, text)
            if shard.sha256 is not None and record.sha256 != shard.sha256:
                raise ShardError(f"shard {shard.path} no longer matches its SHA-256 in {MANIFEST}; its index is not "
                                 "rewritten: remake the set or restore the shard")
            atomic_write(shard.index_path, text)
            repaired.append(shard.index_path)
    return repaired
