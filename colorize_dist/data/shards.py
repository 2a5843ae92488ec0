"""Shard sets on disk: the writer, DALI index files, and the manifest that ties them together.

A shard set is a directory:

    manifest.json            written last, atomically: every complete shard with its sample count, size in
                             bytes, SHA-256, and the CRC-32 of each sample's image (in index order)
    train/train-000000.tar   WebDataset tar shards, one image per sample (`<key>.jpg`, `.png`, ...)
    train/train-000000.idx   DALI's index of the tar beside it: where each sample's bytes are
    val/val-000000.tar ...

Shards are written under a `.partial` name, hashed as they are written, and renamed once closed and
indexed, so an interrupted run (or a full disk) leaves no tar that looks complete, and no manifest.
The loaders trust nothing else: `list_shards` refuses a shard whose size differs from the manifest, and
every sample read is checked against its tar header and CRC-32 (see `reading`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import mmap
import os
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from colorize_dist.data.images import is_progressive_jpeg
from colorize_dist.files import atomic_write

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_RULE = "val if int(sha1(relative path).hexdigest()[:16], 16) / 2**64 < val_fraction, else train"
SAMPLE_ORDER = "sha1 of the relative path (pre-shuffled: neighbours in a shard are unrelated images)"
DALI_INDEX_VERSION = "v1.2"
PEEK_BYTES = 1 << 16  # enough of a JPEG to reach its frame header past EXIF and ICC segments
MAKE_HINT = "make one with `colorize-dist shards make SRC DIR` or `colorize-dist shards synth DIR`"


class MissingShardsError(FileNotFoundError):
    """A shard directory, its manifest, a shard or its index is missing; the message names it and says what to do."""


class ManifestError(ValueError):
    """A manifest that cannot be read or does not describe the requested split."""


class ShardDataError(ManifestError):
    """A shard's bytes do not match its manifest or index (truncated, corrupted, replaced); the message is one
    line naming the shard and the fix."""


class ShardError(ValueError):
    """A shard set cannot be written as asked (bad options, no readable images, an existing output, a full
    disk); the message is one line saying what to change."""


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


def index_images(index_text: str) -> list[tuple[str, int, int, str]]:
    """(extension, data offset, size, member name) of the first image component of each sample that has one,
    in index order: the samples the loaders yield."""
    images = []
    for line in index_text.splitlines()[1:]:
        fields = line.split(" ")
        for start in range(0, len(fields) - 3, 4):
            if image_extension(fields[start]):
                images.append((fields[start], int(fields[start + 1]), int(fields[start + 2]), fields[start + 3]))
                break
    return images


def count_images(index_text: str) -> int:
    """Samples with an image component, i.e. the samples the loaders yield."""
    return len(index_images(index_text))


def write_index(tar_path: Path) -> str:
    text = dali_index(tar_path)
    atomic_write(tar_path.with_suffix(".idx"), text)
    return text


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


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it (the shard's SHA-256 and size)."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return written

    def tell(self) -> int:
        return self.size


class SplitWriter:
    """Writes one split's samples into tar shards of at most `shard_size` samples; each is renamed into place
    (with its DALI index) only once complete. `abort()` removes the one being written."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory, self.split, self.shard_size = directory / split, split, shard_size
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[Shard] = []
        self.bytes_written = 0  # of complete shards
        self._partial: Path | None = None
        self._file: BinaryIO | None = None
        self._hashing: _HashingWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._crc32: list[int] = []
        self._progressive = 0
        self._mtime = time.time()

    def write(self, key: str, extension: str, data: bytes) -> None:
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), self._mtime, 0o444, "bigdata", "bigdata"
        self._tar.addfile(info, io.BytesIO(data))
        self._crc32.append(zlib.crc32(data))
        self._progressive += extension in ("jpg", "jpeg") and is_progressive_jpeg(data)
        if len(self._crc32) == self.shard_size:
            self._finish()

    def close(self) -> list[Shard]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after a failure); complete shards stay."""
        for closer in (self._tar, self._file):
            try:
                if closer is not None:
                    closer.close()
            except (OSError, ValueError):
                pass
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        self._tar = self._file = self._hashing = self._partial = None

    @property
    def partial_bytes(self) -> int:
        return self._hashing.size if self._hashing is not None else 0

    def _open(self) -> None:
        self._partial = self.directory / f"{self.split}-{len(self.shards):06d}.tar.partial"
        self._file = self._partial.open("wb")
        self._hashing = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w")  # noqa: SIM115 (closed in _finish or abort)
        self._crc32, self._progressive = [], 0

    def _finish(self) -> None:
        self._tar.close()  # end-of-archive blocks, through the hashing writer
        self._file.flush()
        os.fsync(self._file.fileno())  # the bytes are on disk before the name says "complete"
        self._file.close()
        partial, size, sha256 = self._partial, self._hashing.size, self._hashing.sha256.hexdigest()
        crc32, progressive = tuple(self._crc32), self._progressive
        self._tar = self._file = self._hashing = None
        index_text = dali_index(partial)
        final = partial.with_suffix("")  # drop ".partial"
        atomic_write(final.with_suffix(".idx"), index_text)
        os.replace(partial, final)
        self._partial = None
        self.bytes_written += size
        self.shards.append(Shard(final, count_images(index_text), size, sha256, crc32, progressive))


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
                if "bytes" in entry:
                    entry["bytes"], entry["sha256"] = int(entry["bytes"]), str(entry["sha256"])
                if "crc32" in entry:
                    entry["crc32"] = tuple(int(value, 16) for value in str(entry["crc32"]).split())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{path} is not a valid shard manifest ({exc!r}); rebuild the shard set") from None
    return manifest


def manifest_shards(directory: Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The shards the manifest lists for `split`, with what it records about each."""
    return [Shard(directory / entry["file"], entry["samples"], entry.get("bytes"), entry.get("sha256"),
                  entry.get("crc32"), int(entry.get("progressive_jpegs", 0)))
            for entry in manifest["splits"].get(split, {}).get("shards", [])]


def verify_hint(directory: Path) -> str:
    return (f"run `colorize-dist shards verify {directory}`, then remake the set (`colorize-dist shards make ... "
            "--force`) or restore the shard")


def list_shards(directory: str | Path, split: str) -> list[Shard]:
    """The shards of one split in manifest order, each checked to be there (tar and index) with the size the
    manifest records: a truncated or replaced shard is refused here, before anything reads it."""
    directory = Path(directory)
    shards = [shard for shard in manifest_shards(directory, read_manifest(directory), split) if shard.samples > 0]
    if not shards:
        raise ManifestError(f"{directory / MANIFEST} lists no {split} samples; rebuild with a different split")
    for shard in shards:
        if not shard.path.is_file():
            raise MissingShardsError(
                f"shard file {shard.path} listed in {directory / MANIFEST} is missing; restore it, "
                "or rebuild the set with `colorize-dist shards make ... --force`"
            )
        if not shard.index_path.is_file():
            raise MissingShardsError(
                f"index {shard.index_path} of shard {shard.path.name} is missing; rewrite it with "
                f"`colorize-dist shards index {directory} --repair`"
            )
        size = shard.path.stat().st_size
        if shard.size is not None and size != shard.size:
            raise ShardDataError(f"shard {shard.path} is {size:,} bytes but {MANIFEST} says {shard.size:,} "
                                 f"(truncated or replaced); {verify_hint(directory)}")
    return shards
