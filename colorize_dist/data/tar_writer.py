"""The writer of WebDataset tar shards: one split's samples into shards of a fixed size.

Each shard is written under a `.partial` name, hashed (SHA-256) and checksummed (CRC-32 per image) as it is
written, fsynced, indexed for DALI, and only then renamed into place, so a crash or a full disk never leaves
a tar that looks complete. The manifest that lists the shards is written by the caller (`manifest`).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import zlib
from pathlib import Path
from typing import BinaryIO

from colorize_dist.data.dali_index import count_images, dali_index
from colorize_dist.data.images import is_progressive_jpeg
from colorize_dist.data.manifest import Shard
from colorize_dist.files import atomic_write


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

