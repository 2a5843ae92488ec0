"""Shard sets on disk: the writer, DALI index files, and the manifest that ties them together.

A shard set is a directory:

    manifest.json            written last, atomically: it lists every complete shard and its sample count
    train/train-000000.tar   WebDataset tar shards, one image per sample (`<key>.jpg`, `.png`, ...)
    train/train-000000.idx   DALI's index of the tar beside it, so `fn.readers.webdataset` need not scan
    val/val-000000.tar ...

Shards are written under a `.partial` name and renamed once closed and indexed, so an interrupted run
leaves no tar that looks complete, and no manifest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from colorize_dist.files import atomic_write

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_RULE = "val if int(sha1(relative path).hexdigest()[:16], 16) / 2**64 < val_fraction, else train"
DALI_INDEX_VERSION = "v1.2"
MAKE_HINT = "make one with `colorize-dist shards make SRC DIR` or `colorize-dist shards synth DIR`"


class MissingShardsError(FileNotFoundError):
    """A shard directory, its manifest or a shard is missing; the message names it and says what to do."""


class ManifestError(ValueError):
    """A manifest that cannot be read or does not describe the requested split."""


class ShardError(ValueError):
    """A shard set cannot be written as asked (bad options, no readable images, an existing output);
    the message is one line saying what to change."""


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int

    @property
    def index_path(self) -> Path:
        return self.path.with_suffix(".idx")


def split_of(relative_path: str, val_fraction: float) -> str:
    """Train or val, from a hash of the path alone, so adding images never moves existing ones."""
    return "val" if path_hash(relative_path) / 2**64 < val_fraction else "train"


def path_hash(relative_path: str) -> int:
    return int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16], 16)


def sample_key(relative_path: str) -> str:
    """A WebDataset key for an image path: no dots (they start the extension), no spaces or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", relative_path)


def batch_key(shard_path: str | Path, tar_key: str) -> str:
    """The identity of a sample across the whole set: `<shard name>/<key in the tar>`."""
    return f"{Path(shard_path).stem}/{tar_key.removeprefix('./')}"


def image_extension(extension: str) -> bool:
    return extension.lower() in IMAGE_EXTENSIONS


def dali_index(tar_path: Path) -> str:
    """The text of DALI's index file (v1.2) for a tar: per sample, `ext offset size name` per component.

    Same grouping as WebDataset and DALI's `wds2idx` (consecutive members sharing the name before the
    first dot form a sample), computed with `tarfile` so that it needs neither DALI nor GNU tar.
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            directory, _, filename = member.name.rpartition("/")
            stem, dot, extension = filename.partition(".")
            if not stem or not dot:  # hidden files, files without extension
                continue
            key = f"{directory}/{stem}" if directory else stem
            entry = f"{extension} {member.offset_data} {member.size} {member.name}"
            if key == last_key:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last_key = key
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def count_images(index_text: str) -> int:
    """Samples with an image component, i.e. the samples the loaders yield."""
    count = 0
    for line in index_text.splitlines()[1:]:
        fields = line.split(" ")
        count += any(image_extension(ext) for ext in fields[0::4])
    return count


def write_index(tar_path: Path) -> str:
    text = dali_index(tar_path)
    atomic_write(tar_path.with_suffix(".idx"), text)
    return text


class SplitWriter:
    """Writes one split's samples into shards of at most `shard_size` samples, each renamed when complete."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory = directory / split
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[Shard] = []
        self._writer = wds.ShardWriter(
            str(self.directory / f"{split}-%06d.tar.partial"), maxcount=shard_size, post=self._finish, verbose=0,
        )

    def write(self, key: str, extension: str, data: bytes) -> None:
        self._writer.write({"__key__": key, extension: data})

    def close(self) -> list[Shard]:
        self._writer.close()
        return self.shards

    def _finish(self, partial_name: str) -> None:
        partial = Path(partial_name)
        index_text = dali_index(partial)
        if count_images(index_text) == 0:  # the writer opens a first shard even if nothing comes
            partial.unlink()
            return
        final = partial.with_suffix("")  # drop ".partial"
        os.replace(partial, final)
        atomic_write(final.with_suffix(".idx"), index_text)
        self.shards.append(Shard(final, count_images(index_text)))


def write_manifest(directory: Path, shards: dict[str, list[Shard]], **info: Any) -> dict[str, Any]:
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "splits": {
            split: {
                "samples": sum(shard.samples for shard in split_shards),
                "shards": [{"file": shard.path.relative_to(directory).as_posix(), "samples": shard.samples}
                           for shard in split_shards],
            }
            for split, split_shards in shards.items()
        },
    }
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingShardsError(f"shard directory {directory} does not exist; {MAKE_HINT}")
    path = directory / MANIFEST
    if not path.is_file():
        raise MissingShardsError(
            f"{path} is missing (an interrupted `shards make`?); rerun it with --force, "
            f"or run `colorize-dist shards index {directory}` for shards written by other tools"
        )
    try:
        manifest = json.loads(path.read_text())
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                entry["file"], entry["samples"] = str(entry["file"]), int(entry["samples"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{path} is not a valid shard manifest ({exc!r}); rebuild the shard set") from None
    return manifest


def list_shards(directory: str | Path, split: str) -> list[Shard]:
    """The shards of one split, checked to exist (tar and index), in manifest order."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    entries = manifest["splits"].get(split, {}).get("shards", [])
    shards = [Shard(directory / entry["file"], entry["samples"]) for entry in entries if entry["samples"] > 0]
    if not shards:
        raise ManifestError(f"{directory / MANIFEST} lists no {split} samples; rebuild with a different split")
    for shard in shards:
        for path in (shard.path, shard.index_path):
            if not path.is_file():
                raise MissingShardsError(
                    f"shard file {path} listed in {directory / MANIFEST} is missing; restore it, "
                    "or rebuild the set with `colorize-dist shards make ... --force`"
                )
    return shards
