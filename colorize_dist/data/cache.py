"""A node's cache of remote shards (`data.cache_dir`): each shard a rank touches is downloaded whole, in the
background, once per node, and read with `pread` from then on. Until it is there, its samples keep coming by
ranged reads, so the first epoch never waits on a download.

    cache_dir/<sha256>.tar          a complete shard, named by the SHA-256 its manifest records
    cache_dir/<sha256>.tar.partial  a download in progress (or killed): never read
    cache_dir/<sha256>.lock         held (flock) by the one process downloading that shard
    cache_dir/.space.lock           held while a download makes room for itself

A shard is named by its own hash, so a changed set never serves stale bytes, and sets that share a shard share
its copy. Every process of the node that wants a shard takes its lock: the first downloads it (hashing as it
writes, into the `.partial` file), checks its size and SHA-256 against the manifest and renames it into place;
the others wait on the lock and find the file there. A killed download leaves a `.partial` (its lock dies with
the process), which the next download of that shard overwrites.

The size bound (`data.cache_max_gb`) counts complete and partial files. To make room, complete shards that the
current set does not list are removed, least recently used first; the set's own shards are never removed: once
they fill the bound, the rest of the set stays remote (removing one to cache another would only change which
shards travel over the network, at the price of a whole-shard download each).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from colorize_dist.config import ConfigError
from colorize_dist.data.store import LocalStore, redact
from colorize_dist.files import writable_directory

if TYPE_CHECKING:
    from colorize_dist.data.manifest import Shard
    from colorize_dist.data.store import RemoteStore

log = logging.getLogger(__name__)

DOWNLOADS = 2  # shards downloaded at once per process
CHUNK = 1 << 20
LOCK_POLL_S = 0.05


class ShardCache:
    """The cache of one remote set's shards in `directory` (made if missing), at most `max_bytes` on the node."""

    def __init__(self, directory: str | Path, shards: tuple[Shard, ...], max_bytes: int):
        try:
            self.directory = writable_directory(directory, "data.cache_dir")
        except OSError as exc:  # a setting to change, as the run ends in one line
            raise ConfigError(str(exc)) from None
        self.max_bytes = max_bytes
        self.shards = {shard.path: shard for shard in shards if shard.sha256 is not None and shard.size is not None}
        self.local = LocalStore(self.directory)
        self._state: dict[Path, str] = {}  # path → "fetching" | "ready" | "remote" (not cached, by choice or fault)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._full = False

    def file(self, shard: Shard) -> Path:
        return self.directory / f"{shard.sha256}.tar"

    def read(self, path: Path, offset: int, length: int, remote: RemoteStore) -> bytes | None:
        """The bytes from the cached copy of `path`; None (and a download started on first use) if it has none."""
        shard = self.shards.get(path)
        if shard is None:
            return None
        with self._lock:
            state = self._state.get(path)
            if state is None and not self._stop.is_set():
                self._state[path] = "fetching"
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(DOWNLOADS, thread_name_prefix="colorize-shard-cache")
                self._pool.submit(self._fetch, shard, remote)
        if state != "ready":
            return None
        try:
            return self.local.read(self.file(shard), offset, length)
        except FileNotFoundError:  # removed by another set's run making room: remote again
            self._state[path] = "remote"
            return None

    def _fetch(self, shard: Shard, remote: RemoteStore) -> None:
        try:
            ready = self._download(shard, remote)
        except _Stopped:
            ready = False
        except Exception as exc:  # a failed download costs nothing but the cache: the ranged reads go on
            log.warning("caching %s failed (%s); its samples stay remote reads", remote.show(shard.path),
                        redact(str(exc)))
            ready = False
        self._state[shard.path] = "ready" if ready else "remote"

    def _download(self, shard: Shard, remote: RemoteStore) -> bool:
        final = self.file(shard)
        partial = final.with_name(final.name + ".partial")
        with _locked(self.directory / f"{shard.sha256}.lock", self._stop):
            if final.exists():
                os.utime(final)  # used now: last in line to be removed
                return True
            partial.unlink(missing_ok=True)  # a killed download's
            complete = False
            try:
                with _locked(self.directory / ".space.lock", self._stop):
                    if self._full or not self._make_room(shard.size):
                        if not self._full:
                            log.warning("data.cache_dir %s is full (data.cache_max_gb) with this set's shards; the "
                                        "rest stay remote reads", self.directory)
                        self._full = True
                        return False
                    file = partial.open("wb")
                    try:
                        os.posix_fallocate(file.fileno(), 0, shard.size)  # counted at its full size by others
                    except OSError:
                        file.close()
                        raise
                complete = self._write(file, shard, remote)
            finally:
                if not complete:  # a fault, a stop or other bytes: nothing left taking room
                    partial.unlink(missing_ok=True)
            if complete:
                os.replace(partial, final)
            return complete

    def _write(self, file: BinaryIO, shard: Shard, remote: RemoteStore) -> bool:
        """Download `shard` into `file` (and close it); True once its bytes are the manifest's, False if the cache
        closed meanwhile."""
        with file:
            digest, written = hashlib.sha256(), 0
            for chunk in remote.chunks(shard.path, CHUNK):
                if self._stop.is_set():
                    return False
                file.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            file.truncate(written)
            file.flush()
            os.fsync(file.fileno())
        if written != shard.size or digest.hexdigest() != shard.sha256:
            raise OSError(f"the download is {written:,} bytes with SHA-256 {digest.hexdigest()[:12]}..., the "
                          f"manifest says {shard.size:,} and {shard.sha256[:12]}... (the shard changed?)")
        return True

    def _make_room(self, size: int) -> bool:
        """Whether `size` more bytes fit, after removing other sets' shards (least recently used first)."""
        stats = {path: _stat(path) for path in self.directory.iterdir()
                 if path.name.endswith((".tar", ".tar.partial"))}
        stats = {path: stat for path, stat in stats.items() if stat is not None}
        used, ours = sum(stat.st_size for stat in stats.values()), {self.file(s) for s in self.shards.values()}
        others = sorted((path for path in stats if path.suffix == ".tar" and path not in ours),
                        key=lambda path: stats[path].st_mtime)
        while used + size > self.max_bytes and others:
            path = others.pop(0)
            path.unlink(missing_ok=True)  # a process still reading it keeps its open descriptor
            used -= stats[path].st_size
        return used + size <= self.max_bytes

    def close(self) -> None:
        """Stop: a download in progress ends at its next chunk (its `.partial` is never read)."""
        self._stop.set()
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        self.local.close()


class _Stopped(Exception):
    """The cache was closed while waiting for a lock."""


@contextlib.contextmanager
def _locked(path: Path, stop: threading.Event) -> Iterator[None]:
    """An exclusive flock on `path` (made if missing) for the block; the kernel drops it if the process dies.
    Waited for in short polls, so that a closed cache does not hold its process's exit behind another's download."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop.wait(LOCK_POLL_S):
                    raise _Stopped from None
        yield
    finally:
        os.close(descriptor)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # a `.partial` renamed meanwhile
        return None
