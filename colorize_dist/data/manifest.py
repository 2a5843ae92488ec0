"""A shard set on disk, as its manifest describes it: the manifest's format, the shards it lists, the errors.

A shard set is a directory:

    manifest.json            written last, atomically: every complete shard with its sample count, size in
                             bytes, SHA-256, and the CRC-32 of each sample's image (in index order)
    train/train-000000.tar   WebDataset tar shards, one image per sample (`<key>.jpg`, `.png`, ...)
    train/train-000000.idx   DALI's index of the tar beside it (`dali_index`): where each sample's bytes are
    val/val-000000.tar ...

    make-in-progress.json    `shards make`'s plan (source, inputs), written before the first shard and removed
                             once the manifest is in place: while it is there, the set is not complete

Shards are written under a `.partial` name (`tar_writer`), hashed as they are written, and renamed once closed
and indexed, so an interrupted run (or a full disk) leaves no tar that looks complete, and no manifest; the
plan and any `.partial` left say that a make was interrupted (`interrupted_make`), so neither `shards index`
nor the loaders take the shards that did get written for a whole set.
The loaders trust nothing else: `list_shards` refuses a shard whose size differs from the manifest, and
every sample read is checked against its tar header and CRC-32 (see `reading`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import mmap
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colorize_dist.data.dali_index import count_images, index_images
from colorize_dist.data.images import is_progressive_jpeg
from colorize_dist.data.store import STARTUP_HINT, LocalStore, RemoteStore, Store, StoreUnavailable, open_store, redact
from colorize_dist.errors import UserError
from colorize_dist.files import atomic_write

MANIFEST = "manifest.json"
MAKE_PLAN = "make-in-progress.json"
SPLITS = ("train", "val")
PEEK_BYTES = 1 << 16  # enough of a JPEG to reach its frame header past EXIF and ICC segments
MAKE_HINT = "make one with `colorize-dist shards make SRC DIR` or `colorize-dist shards synth DIR`"


class MissingShardsError(UserError, FileNotFoundError):
    """A shard directory, its manifest, a shard or its index is missing; the message names it and says what to do."""


class ManifestError(UserError, ValueError):
    """A manifest that cannot be read or does not describe the requested split."""


class ShardDataError(ManifestError):
    """A shard's bytes do not match its manifest or index (truncated, corrupted, replaced); the message is one
    line naming the shard and the fix."""


class ShardsUnavailable(ShardDataError):
    """The shards' server stopped answering a sample's read after every retry. `reason` names the URL, what was
    tried and for how long; the trainer stops every rank together after a checkpoint and says how to go on."""

    @property
    def reason(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return f"{self.reason}; {STARTUP_HINT}"


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int
    size: int | None = None  # bytes; None in manifests written before sizes were recorded
    sha256: str | None = None
    crc32: tuple[int, ...] | None = field(default=None, repr=False)  # per sample with an image, in index order
    progressive: int = 0  # progressive JPEGs in the shard (the GPU's hardware decoder skips them)

    @property
    def index_path(self) -> Path:
        return self.path.with_suffix(".idx")


def shard_record(path: Path, index_text: str) -> Shard:
    """A complete shard's manifest entry, from its bytes: size, SHA-256, each image's CRC-32, progressive JPEGs."""
    images = index_images(index_text)
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        view = memoryview(data)
        try:
            if any(offset + length > size for _, offset, length, _ in images):
                raise tarfile.ReadError("its index points past the end of the file")
            crc32 = tuple(zlib.crc32(view[offset:offset + length]) for _, offset, length, _ in images)
            progressive = sum(is_progressive_jpeg(bytes(view[offset:offset + min(length, PEEK_BYTES)]))
                              for extension, offset, length, _ in images if extension.lower() in ("jpg", "jpeg"))
            sha256 = hashlib.sha256(view).hexdigest()
        finally:
            view.release()
            if size:
                data.close()
    return Shard(path, len(images), size, sha256, crc32, progressive)


def write_manifest(directory: Path, shards: dict[str, list[Shard]], **info: Any) -> dict[str, Any]:
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "splits": {
            split: {"samples": sum(shard.samples for shard in split_shards),
                    "shards": [_manifest_entry(directory, shard) for shard in split_shards]}
            for split, split_shards in shards.items()
        },
    }
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest_entry(directory: Path, shard: Shard) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": shard.path.relative_to(directory).as_posix(), "samples": shard.samples}
    if shard.size is not None:
        entry.update(bytes=shard.size, sha256=shard.sha256, progressive_jpegs=shard.progressive)
    if shard.crc32 is not None:
        entry["crc32"] = " ".join(f"{value:08x}" for value in shard.crc32)
    return entry


def read_manifest(location: str | Path | Store) -> dict[str, Any]:
    """The manifest of the shard set at `location` (a directory, a URL, or its open store), fetched once."""
    store = location if isinstance(location, (LocalStore, RemoteStore)) else open_store(location)
    if not store.exists():
        raise MissingShardsError(f"shard directory {store.where} does not exist; {MAKE_HINT}")
    path = store.root / MANIFEST
    try:
        text = store.read_text(path)
    except FileNotFoundError:
        if isinstance(store, RemoteStore):
            raise MissingShardsError(f"{store.show(path)} is not there (404); check the URL (data.shards must name "
                                     f"the folder that holds {MANIFEST})") from None
        if (interrupted := interrupted_make(store.root)) is not None:
            raise MissingShardsError(f"{path} is missing: {interrupted}") from None
        raise MissingShardsError(
            f"{path} is missing (an interrupted `shards make`?); rerun it with --force, "
            f"or run `colorize-dist shards index {store.where}` for shards written by other tools"
        ) from None
    except StoreUnavailable as exc:
        raise ManifestError(f"{exc}; {STARTUP_HINT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{store.show(path)} cannot be read ({redact(str(exc))})") from None
    try:
        manifest = json.loads(text)
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                entry["file"], entry["samples"] = str(entry["file"]), int(entry["samples"])
                if "bytes" in entry:
                    entry["bytes"], entry["sha256"] = int(entry["bytes"]), str(entry["sha256"])
                if "crc32" in entry:
                    entry["crc32"] = tuple(int(value, 16) for value in str(entry["crc32"]).split())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{store.show(path)} is not a valid shard manifest ({exc!r}); rebuild the shard set") \
            from None
    return manifest


def write_make_plan(directory: Path, source: str, inputs: int) -> None:
    """Record what `shards make` is about to write into `directory` (see `interrupted_make`)."""
    atomic_write(directory / MAKE_PLAN, json.dumps({"source": source, "inputs": inputs}, indent=1) + "\n")


def interrupted_make(directory: Path) -> str | None:
    """What shows that a `shards make` into `directory` did not finish (its plan, `.partial` shards) and the command
    that remakes the set; None when nothing does."""
    partial = sorted(path.name for split in SPLITS for path in (directory / split).glob("*.partial"))
    plan = None
    if (directory / MAKE_PLAN).is_file():
        try:
            plan = json.loads((directory / MAKE_PLAN).read_text())
        except (OSError, ValueError):
            plan = {}
    if plan is None and not partial:
        return None
    images = sum(count_images(path.with_suffix(".idx").read_text()) for split in SPLITS
                 for path in (directory / split).glob("*.tar") if path.with_suffix(".idx").is_file())
    evidence = [f"{images} images in complete shards"]
    if plan is not None:
        evidence.append(f"{plan.get('inputs', 'an unknown number of')} inputs planned in {MAKE_PLAN}")
    if partial:
        evidence.append(f"{len(partial)} unfinished shard(s): {', '.join(partial[:2])}{' ...' * (len(partial) > 2)}")
    source = (plan or {}).get("source", "SOURCE")
    return (f"a `shards make` into {directory} did not finish ({'; '.join(evidence)}); remake the set with "
            f"`colorize-dist shards make {source} {directory} ... --force` (its options as before)")


def manifest_sha256(location: str | Path) -> str:
    """The SHA-256 of the manifest of the shard set at `location` (a directory or a URL): which set was read."""
    store = open_store(location)
    path = store.root / MANIFEST
    try:
        return hashlib.sha256(store.read(path, 0, store.size(path) or 0)).hexdigest()
    finally:
        store.close()


def manifest_shards(directory: Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The shards the manifest lists for `split`, with what it records about each."""
    return [Shard(directory / entry["file"], entry["samples"], entry.get("bytes"), entry.get("sha256"),
                  entry.get("crc32"), int(entry.get("progressive_jpegs", 0)))
            for entry in manifest["splits"].get(split, {}).get("shards", [])]


def verify_hint(directory: str | Path) -> str:
    return (f"run `colorize-dist shards verify {directory}`, then remake the set (`colorize-dist shards make ... "
            "--force`) or restore the shard")


def list_shards(location: str | Path | Store, split: str) -> list[Shard]:
    """The shards of one split in manifest order, each checked to be there (tar and index) with the size the
    manifest records: a truncated or replaced shard is refused here, before anything reads it."""
    store = location if isinstance(location, (LocalStore, RemoteStore)) else open_store(location)
    manifest = read_manifest(store)
    shards = [shard for shard in manifest_shards(store.root, manifest, split) if shard.samples > 0]
    if not shards:
        if split == "train" and manifest.get("val_fraction") == 1:
            fix = "it is a test set (made with --val-fraction 1): evaluate on it, train on another set"
        else:
            fix = f"remake it with a --val-fraction that leaves {split} images"
        raise ManifestError(f"{store.show(store.root / MANIFEST)} lists no {split} images; {fix}")
    try:
        sizes = list(store.map(store.size, [shard.path for shard in shards]))
        indexes = list(store.map(store.size, [shard.index_path for shard in shards]))
    except StoreUnavailable as exc:
        raise ManifestError(f"{exc}; {STARTUP_HINT}") from None
    except OSError as exc:
        raise ManifestError(f"{store.where} cannot be read ({redact(str(exc))})") from None
    for shard, size, index_size in zip(shards, sizes, indexes, strict=True):
        if size is None:
            raise MissingShardsError(
                f"shard file {store.show(shard.path)} listed in {store.show(store.root / MANIFEST)} is missing; "
                "restore it, or rebuild the set with `colorize-dist shards make ... --force`"
            )
        if index_size is None:
            raise MissingShardsError(
                f"index {store.show(shard.index_path)} of shard {shard.path.name} is missing; rewrite it with "
                f"`colorize-dist shards index {store.where} --repair`"
            )
        if shard.size is not None and size != shard.size:
            raise ShardDataError(f"shard {store.show(shard.path)} is {size:,} bytes but {MANIFEST} says "
                                 f"{shard.size:,} (truncated or replaced); {verify_hint(store.where)}")
    return shards
