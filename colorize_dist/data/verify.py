"""Check a shard set against its manifest, changing nothing, so a copied or damaged set is found before training."""

from __future__ import annotations

import io
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from colorize_dist.data.dali_index import dali_index, index_images
from colorize_dist.data.images import to_rgb8
from colorize_dist.data.manifest import MANIFEST, SPLITS, Shard, manifest_shards, read_manifest
from colorize_dist.data.store import LocalStore, RemoteStore, open_store, redact
from colorize_dist.files import sha256_of

REMAKE = "remake the set (`colorize-dist shards make ... --force`) or restore the shard"


@dataclass(frozen=True)
class VerifyReport:
    """A shard set checked: (split, shards, samples) per split, one line per problem (each naming the file and
    its fix), whether the manifest records sizes and checksums, and the set's name for display (credentials
    redacted)."""

    splits: list[tuple[str, int, int]]
    problems: list[str]
    checksums_recorded: bool
    where: str


def verify_set(location: str | Path, *, deep: bool = False) -> VerifyReport:
    """Check every shard of the set at `location` (a directory or a URL) against its manifest, changing nothing;
    `deep` also re-hashes every shard. A set without a readable manifest is a UserError (from `read_manifest`)."""
    store = open_store(location)
    manifest = read_manifest(store)
    problems = []
    listed = set()
    splits = []
    for split, summary in manifest["splits"].items():
        shards = manifest_shards(store.root, manifest, split)
        listed.update(shard.path for shard in shards)
        for shard in tqdm(shards, desc=f"verify {split}", unit="shard", leave=False):
            if isinstance(store, LocalStore):
                problems += check_shard(shard, manifest.get("resolution"), store.root, deep=deep)
            else:
                problems += check_remote_shard(store, shard, manifest.get("resolution"), deep=deep)
        splits.append((split, len(shards), summary["samples"]))
    for split in SPLITS if isinstance(store, LocalStore) else ():  # a web server lists no folders
        for path in sorted((store.root / split).glob("*")):
            if path.suffix == ".tar" and path not in listed:
                problems.append(f"{path}: not listed in {MANIFEST}")
            elif path.suffix == ".partial":
                problems.append(f"{path}: left by an interrupted run; remake the set with --force")
    checksums = all("crc32" in entry for split in manifest["splits"].values() for entry in split["shards"])
    return VerifyReport(splits=splits, problems=problems, checksums_recorded=checksums, where=store.where)


def check_remote_shard(store: RemoteStore, shard: Shard, resolution: int | None, *, deep: bool) -> list[str]:
    """`check_shard` of a shard at a URL: it and its index are fetched whole into a scratch folder (one shard at
    a time), checked there, and the problems name the URL."""
    with tempfile.TemporaryDirectory(prefix="colorize-verify-") as scratch:
        local = Path(scratch) / shard.path
        local.parent.mkdir(parents=True, exist_ok=True)
        for path in (shard.path, shard.index_path):
            try:
                size = store.size(path)
                if size is not None:
                    (Path(scratch) / path).write_bytes(store.read(path, 0, size))
            except OSError as exc:
                return [f"{store.show(path)}: cannot be read ({redact(str(exc))}); check the server"]
        problems = check_shard(replace(shard, path=local), resolution, store.where, deep=deep)
    return [problem.replace(f"{scratch}/", store.where) for problem in problems]


def check_shard(shard: Shard, resolution: int | None, directory: str | Path, *, deep: bool = False) -> list[str]:
    """Problems with one shard, each naming the file and its fix: size, tar, index, counts, checksums, images."""
    if not shard.path.is_file():
        return [f"{shard.path}: missing; {REMAKE}"]
    problems = []
    size = shard.path.stat().st_size
    if shard.size is not None and size != shard.size:
        problems.append(f"{shard.path}: {size:,} bytes, {MANIFEST} says {shard.size:,} (truncated or replaced); "
                        f"{REMAKE}")
    try:
        expected_index = dali_index(shard.path)
    except (tarfile.TarError, OSError) as exc:
        return [*problems, f"{shard.path}: not a readable tar ({exc}); {REMAKE}"]
    if not shard.index_path.is_file():
        problems.append(f"{shard.index_path}: missing; rewrite it with `colorize-dist shards index {directory} "
                        "--repair`")
    elif shard.index_path.read_text() != expected_index:
        problems.append(f"{shard.index_path}: does not match {shard.path.name}; rewrite it with `colorize-dist "
                        f"shards index {directory} --repair`")
    images = index_images(expected_index)
    if len(images) != shard.samples:
        problems.append(f"{shard.path}: {len(images)} images, {MANIFEST} says {shard.samples}; {REMAKE}")
    if shard.crc32 is not None and len(shard.crc32) != len(images):
        problems.append(f"{shard.path}: {MANIFEST} records {len(shard.crc32)} CRC-32s for {len(images)} images; "
                        f"{REMAKE}")
    with shard.path.open("rb") as file:
        for number, (_, offset, length, member) in enumerate(images):
            file.seek(offset)
            data = file.read(length)
            if shard.crc32 is not None and number < len(shard.crc32) and zlib.crc32(data) != shard.crc32[number]:
                problems.append(f"{shard.path}: sample {member} does not match its CRC-32 in {MANIFEST} (its bytes "
                                f"changed); {REMAKE}")
                continue
            problem = check_image(data, resolution)
            if problem:
                problems.append(f"{shard.path}: sample {member} {problem}")
    if deep and shard.sha256 is not None and sha256_of(shard.path) != shard.sha256:
        problems.append(f"{shard.path}: SHA-256 differs from {MANIFEST} (the file changed); {REMAKE}")
    return problems


def check_image(data: bytes, resolution: int | None) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
            to_rgb8(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"does not decode ({exc})"
    if resolution is not None and size != (resolution, resolution):
        return f"is {size[0]}x{size[1]}, manifest says {resolution}x{resolution}"
    return None
