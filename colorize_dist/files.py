"""Small file-system and error-message helpers shared by every command.

A file a later step trusts (a shard index, a manifest, an exported generator, cached FID statistics,
the run's config) is written under a temporary name and renamed into place, so a crash or a full
disk never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` only if the block ends without error.

    The temporary name keeps `path`'s suffix (numpy and safetensors look at it) and is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as temporary:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)


def first_line(exc: BaseException) -> str:
    """An exception's message folded to one line (its type's name if it has none), for one-line errors."""
    text = " ".join(str(exc).strip().split("\n")[0].split())
    return text or type(exc).__name__


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), read in blocks."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def writable_directory(path: str | Path, option: str) -> Path:
    """`path` as a directory that exists (made if missing) and takes new files, checked before any work is done.

    Raises OSError with one line naming `option`, the path, the reason (an existing file, no permission, a
    read-only file system) and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is an existing file; name a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OSError(f"{option} {path} cannot be written ({exc.strerror or first_line(exc)}); choose a folder "
                      "on a writable file system that you may write to") from None
    return path
