"""Helpers shared by the data tests: the CLI, and the ways a shard set gets damaged."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from colorize_dist import cli

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="nvidia.dali not installed")

GOOD_IMAGES = 14  # in the `image_folder` fixture, besides one truncated JPEG and one text file named .jpg


def run_cli(*argv: str | Path) -> int:
    return cli.main([str(arg) for arg in argv])


def index_entries(tar: Path) -> list[tuple[str, int, int, str]]:
    """(extension, data offset, size, member) of each sample in a shard's DALI index."""
    entries = []
    for line in tar.with_suffix(".idx").read_text().splitlines()[1:]:
        extension, offset, size, member = line.split(" ")[:4]
        entries.append((extension, int(offset), int(size), member))
    return entries


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# Each fault damages one shard of a copy of a set, as users meet them; returns the damaged file.

def flip_payload(shards: Path, shard: str, *, every_sample: bool = False) -> Path:
    """Bytes in the middle of an image change (a bad disk, a bad copy); the size stays the same."""
    tar = shards / shard
    for _, offset, size, _ in index_entries(tar)[: None if every_sample else 1]:
        flip_byte(tar, offset + size // 2)
    return tar


def flip_sample(shards: Path, shard: str, *, key: str) -> Path:
    """Bytes in the middle of one sample's image change (its tar key `key`)."""
    tar = shards / shard
    (offset, size), = [(offset, size) for _, offset, size, member in index_entries(tar)
                       if member.split(".")[0].removeprefix("./") == key]
    flip_byte(tar, offset + size // 2)
    return tar


def flip_header(shards: Path, shard: str) -> Path:
    """A byte of a member's tar header (its name) changes; the image bytes are intact."""
    tar = shards / shard
    _, offset, _, _ = index_entries(tar)[-1]
    flip_byte(tar, offset - 512 + 3)
    return tar


def truncate(shards: Path, shard: str) -> Path:
    tar = shards / shard
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    return tar


def remove_index(shards: Path, shard: str) -> Path:
    index = (shards / shard).with_suffix(".idx")
    index.unlink()
    return index


def stale_index(shards: Path, shard: str) -> Path:
    """The shard's index lists its samples in another order (an index kept from an earlier write of the shard);
    the tar is intact."""
    index = (shards / shard).with_suffix(".idx")
    header, first, second, *rest = index.read_text().splitlines(keepends=True)
    index.write_text("".join([header, second, first, *rest]))
    return index


def misstate_size(shards: Path, shard: str) -> Path:
    """The manifest records another size for the shard (an edited or mixed-up manifest)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard:
                entry["bytes"] += 512
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards / shard


def damaged_copy(shards: Path, out: Path, fault, shard: str, **options) -> tuple[Path, Path]:
    """A copy of `shards` at `out` with `fault` applied to `shard`; returns (the copy, the damaged file)."""
    shutil.copytree(shards, out)
    return out, fault(out, shard, **options)
