"""Where a shard set's bytes come from: a local directory (`pread`), a web server (ranged HTTP GETs) or any
other fsspec filesystem (`s3://`, `gs://`, ... once its package is installed).

    store = open_store("https://data.example.org/faces/")   # or "/data/faces", or "s3://bucket/faces"
    manifest = store.read_text(Path("manifest.json"))
    data = store.read(Path("train/train-000000.tar"), offset, length)

A store reads files by their path in the set (`root / file` as the manifest lists it) and names them in messages
by `show(path)`: the local path, or the URL with any credentials (user:password@, a signed query string)
redacted. Remote reads are retried on transient faults (HTTP 429 and 5xx, timeouts, resets, a short body) with
exponential backoff, bounded in count and time; a fault that outlasts them is a `StoreUnavailable` naming the URL,
what was tried and for how long. A remote read of a file that is not there (404) is a `FileNotFoundError`.
Reads release the GIL (`pread`, sockets), so the read-ahead keeps many of them in flight at once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from colorize_dist.data.cache import ShardCache

MAX_OPEN_FILES = 64  # local shards kept open per store (a rank of a large set touches thousands)
RETRIES = 6  # attempts after the first, per remote read
RETRY_FIRST_WAIT_S = 0.05  # then doubled per attempt, up to RETRY_MAX_WAIT_S
RETRY_MAX_WAIT_S = 2.0
RETRY_WINDOW_S = 30.0  # no new attempt starts this long after the first
TIMEOUT_S = 10.0  # connect and read timeout of one request
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
T, R = TypeVar("T"), TypeVar("R")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


class StoreUnavailable(OSError):
    """A remote store did not answer a read after every retry; the message names the URL, what was tried and for
    how long."""


STARTUP_HINT = "rerun once it answers"  # after a StoreUnavailable before the first step (manifest, sizes, indexes)


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it hidden: user:password@ and query strings (signatures)."""

    def hide(match: re.Match) -> str:
        parts = urlsplit(match.group(0))
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", parts.fragment))

    return URL.sub(hide, text)


class LocalStore:
    """A shard set in a local directory; each read is one `pread` on a descriptor kept open (least recently used
    closed first)."""

    def __init__(self, directory: str | Path):
        self.root = Path(directory.removeprefix("file://") if isinstance(directory, str) else directory)
        self.where = str(self.root)
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()  # a repositioned loader's old read-ahead thread may still be reading

    def show(self, path: Path) -> str:
        return str(path)

    def exists(self) -> bool:
        return self.root.is_dir()

    def size(self, path: Path) -> int | None:
        """Bytes in the file, None if it is not there."""
        return path.stat().st_size if path.is_file() else None

    def read_text(self, path: Path) -> str:
        return path.read_text()

    def read(self, path: Path, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the file)."""
        return os.pread(self._descriptor(path), length, offset)

    def map(self, read: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`read` of each item, in order: one after the other (a `pread` from the page cache takes microseconds)."""
        return map(read, items)

    def _descriptor(self, path: Path) -> int:
        with self._lock:
            if path in self._files:
                self._files.move_to_end(path)
                return self._files[path]
            if len(self._files) >= MAX_OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            self._files[path] = os.open(path, os.O_RDONLY)
            return self._files[path]

    def close(self) -> None:
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()


class RemoteStore:
    """A shard set at a URL: paths are relative to it (`root` is `Path()`), each read one ranged request."""

    def __init__(self, url: str, *, connections: int = 64):
        parts = urlsplit(url)
        self.url = urlunsplit(parts._replace(path=parts.path if parts.path.endswith("/") else parts.path + "/"))
        self.where = redact(self.url)
        self.root = Path()
        self.connections = connections
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.cache: ShardCache | None = None  # see `data.cache`

    def map(self, read: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """`read` of each item, in order, up to `connections` at once (all the store's callers together): the
        round trips overlap instead of adding up."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.connections, thread_name_prefix="colorize-shard-read")
        return self._pool.map(read, items)

    def show(self, path: Path) -> str:
        return redact(self._url(path))

    def _url(self, path: Path) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=parts.path + path.as_posix()))

    def exists(self) -> bool:
        return True  # known when the manifest is read

    def size(self, path: Path) -> int | None:
        return self._retried(path, "HEAD", lambda: self._size(self._url(path)))

    def read_text(self, path: Path) -> str:
        data = self._retried(path, "GET", lambda: self._get(self._url(path), None))
        if data is None:
            raise FileNotFoundError(f"{self.show(path)} is not there (404)")
        return data.decode()

    def read(self, path: Path, offset: int, length: int) -> bytes:
        """`length` bytes from `offset`; fewer only where the file ends (a short answer is retried, not returned).
        From the node's cached copy of the file where it has one."""
        if self.cache is not None and (data := self.cache.read(path, offset, length, self)) is not None:
            return data
        data = self._retried(path, f"GET bytes {offset}-{offset + length - 1}",
                             lambda: self._get(self._url(path), (offset, length)))
        if data is None:
            raise FileNotFoundError(f"{self.show(path)} is not there (404)")
        return data

    def _retried(self, path: Path, what: str, attempt):
        """`attempt()`, retried with exponential backoff on transient faults (`_Transient`)."""
        start, wait, tries = time.monotonic(), RETRY_FIRST_WAIT_S, 0
        while True:
            tries += 1
            try:
                return attempt()
            except _Transient as exc:
                elapsed = time.monotonic() - start
                if tries > RETRIES or elapsed + wait > RETRY_WINDOW_S:
                    raise StoreUnavailable(f"{self.show(path)} did not answer: {what} tried {tries} times over "
                                           f"{elapsed:.1f} s, last {redact(str(exc))}") from None
                time.sleep(wait)
                wait = min(2 * wait, RETRY_MAX_WAIT_S)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


class HttpStore(RemoteStore):
    """http(s): ranged GETs through one thread-safe urllib3 connection pool (a request costs a third of the CPU time
    of one through `requests`). Basic-auth credentials come from the URL (user:password@) or ~/.netrc."""

    def __init__(self, url: str, *, connections: int = 64):
        import urllib3

        parts = urlsplit(url)
        self.headers = {}
        credentials = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else _netrc_login(parts.hostname)
        if credentials:
            self.headers = urllib3.make_headers(basic_auth=unquote(credentials))
        super().__init__(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), connections=connections)
        self.pool = urllib3.PoolManager(maxsize=connections, retries=False,
                                        timeout=urllib3.Timeout(connect=TIMEOUT_S, read=TIMEOUT_S))

    def chunks(self, path: Path, size: int) -> Iterator[bytes]:
        """The whole file, `size` bytes at a time (one GET, not retried: the node cache's download)."""
        response = self.pool.request("GET", self._url(path), headers=self.headers, preload_content=False)
        try:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} {response.reason}")
            yield from response.stream(size)
        except BaseException:  # a fault or a stop: the rest of the body is not read, so the connection is not reused
            response.close()
            raise
        response.release_conn()

    def _size(self, url: str) -> int | None:
        response = self._request("HEAD", url, {})
        return None if response is None else int(response.headers["Content-Length"])

    def _get(self, url: str, span: tuple[int, int] | None) -> bytes | None:
        headers = {} if span is None else {"Range": f"bytes={span[0]}-{span[0] + span[1] - 1}"}
        response = self._request("GET", url, headers)
        if response is None:
            return None
        if response.status == 416:  # a range past the end of the file: no bytes there
            return b""
        data = response.data
        if span is not None:
            if response.status != 206:  # a server that ignores ranges sends the whole file
                data = data[span[0]:span[0] + span[1]]
            expected = _content_length(response.headers.get("Content-Range"), span)
            if len(data) < expected:
                raise _Transient(f"a short body ({len(data)} of {expected} bytes)")
        return data

    def _request(self, method: str, url: str, headers: dict[str, str]):
        """The answer (body read), None for 404; transient faults raise `_Transient`, other errors OSError."""
        import urllib3

        try:
            response = self.pool.request(method, url, headers={**self.headers, **headers})
        except urllib3.exceptions.HTTPError as exc:  # connection refused or reset, timeouts, a cut-off body
            raise _Transient(type(exc).__name__) from None
        if response.status == 404:
            return None
        if response.status in TRANSIENT_STATUSES:
            raise _Transient(f"HTTP {response.status}")
        if response.status >= 400 and response.status != 416:
            raise OSError(f"{redact(url)}: HTTP {response.status} {response.reason}")
        return response


def _netrc_login(host: str | None) -> str | None:
    """user:password for `host` from ~/.netrc, if it lists it."""
    import netrc

    try:
        entry = netrc.netrc().authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{entry[0]}:{entry[2]}" if entry else None


class FsspecStore(RemoteStore):
    """Any fsspec URL (`s3://`, `gs://`, `hf://`, ...): `cat_file` with a byte range."""

    def __init__(self, url: str, *, connections: int = 64):
        import fsspec

        super().__init__(url, connections=connections)
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:  # e.g. "Install s3fs to access S3"
            raise FileNotFoundError(f"{self.where} cannot be read here: {exc}") from None

    def _file(self, url: str) -> str:
        return f"{self.base.rstrip('/')}/{url[len(self.url):]}"

    def chunks(self, path: Path, size: int) -> Iterator[bytes]:
        """The whole file, `size` bytes at a time (the node cache's download)."""
        with self.fs.open(self._file(self._url(path)), "rb") as file:
            while chunk := file.read(size):
                yield chunk

    def _size(self, url: str) -> int | None:
        try:
            return self._call(lambda: self.fs.size(self._file(url)))
        except FileNotFoundError:
            return None

    def _get(self, url: str, span: tuple[int, int] | None) -> bytes | None:
        try:
            if span is None:
                return self._call(lambda: self.fs.cat_file(self._file(url)))
            data = self._call(lambda: self.fs.cat_file(self._file(url), span[0], span[0] + span[1]))
        except FileNotFoundError:
            return None
        return data

    @staticmethod
    def _call(read):
        try:
            return read()
        except FileNotFoundError:
            raise
        except (TimeoutError, ConnectionError) as exc:
            raise _Transient(type(exc).__name__) from None


Store = LocalStore | RemoteStore


class _Transient(Exception):
    """A fault worth another attempt (a busy or restarting server, a dropped connection, a cut-off body)."""


def _content_length(content_range: str | None, span: tuple[int, int]) -> int:
    """Bytes a ranged answer should hold: the span, less what lies past the end of the file (`.../total`)."""
    total = content_range.rpartition("/")[2] if content_range else "*"
    return min(span[1], max(0, int(total) - span[0])) if total.isdigit() else span[1]


def open_store(location: str | Path, *, connections: int = 64) -> LocalStore | RemoteStore:
    """The store of a shard set: a local directory, an http(s) URL, or any other URL fsspec reads."""
    if not is_url(location):
        return LocalStore(location)
    scheme = str(location).partition("://")[0].lower()
    if scheme in ("http", "https"):
        return HttpStore(str(location), connections=connections)
    return FsspecStore(str(location), connections=connections)
