"""Check a shard set: every shard opens, every image decodes, counts match the manifest, indexes match the tars.

Prints a summary; exits 1 naming each file at fault (2 if the set has no readable manifest).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from colorize_dist.data.shards import (
    MANIFEST,
    SPLITS,
    ManifestError,
    MissingShardsError,
    Shard,
    count_images,
    dali_index,
    image_extension,
    read_manifest,
)
from colorize_dist.files import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="shard set directory (holds manifest.json)")


def main(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.directory)
    except (MissingShardsError, ManifestError) as exc:
        print(f"shards verify: {first_line(exc)}", file=sys.stderr)
        return 2
    problems = []
    listed = set()
    print(f"{'split':<6} {'shards':>7} {'samples':>9}")
    for split, summary in manifest["splits"].items():
        shards = [Shard(args.directory / entry["file"], entry["samples"]) for entry in summary["shards"]]
        listed.update(shard.path for shard in shards)
        for shard in tqdm(shards, desc=f"verify {split}", unit="shard", leave=False):
            problems += check_shard(shard, manifest.get("resolution"))
        print(f"{split:<6} {len(shards):>7} {summary['samples']:>9}")
    for split in SPLITS:
        for path in sorted((args.directory / split).glob("*")):
            if path.suffix == ".tar" and path not in listed:
                problems.append(f"{path}: not listed in {MANIFEST}")
            elif path.suffix == ".partial":
                problems.append(f"{path}: left by an interrupted run; remake the set with --force")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{len(problems)} problem(s) in {args.directory}" if problems else f"{args.directory}: OK")
    return 1 if problems else 0


def check_shard(shard: Shard, resolution: int | None) -> list[str]:
    """Problems with one shard, each naming the file: tar, index, decoding, counts and sizes."""
    if not shard.path.is_file():
        return [f"{shard.path}: missing"]
    try:
        expected_index = dali_index(shard.path)
    except (tarfile.TarError, OSError) as exc:
        return [f"{shard.path}: not a readable tar ({exc})"]
    problems = []
    if not shard.index_path.is_file():
        problems.append(f"{shard.index_path}: missing; run `colorize-dist shards index` to rewrite it")
    elif shard.index_path.read_text() != expected_index:
        problems.append(f"{shard.index_path}: does not match {shard.path.name}; rewrite it with `shards index`")
    if count_images(expected_index) != shard.samples:
        problems.append(f"{shard.path}: {count_images(expected_index)} images, manifest says {shard.samples}")
    samples = wds.DataPipeline(wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples())
    try:
        for sample in samples:
            for extension in filter(image_extension, sample):
                problem = check_image(sample[extension], resolution)
                if problem:
                    problems.append(f"{shard.path}: sample {sample['__key__']}.{extension} {problem}")
    except (tarfile.TarError, OSError, ValueError) as exc:
        problems.append(f"{shard.path}: unreadable after some samples ({exc})")
    return problems


def check_image(data: bytes, resolution: int | None) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except (OSError, ValueError, SyntaxError) as exc:
        return f"does not decode ({exc})"
    if resolution is not None and size != (resolution, resolution):
        return f"is {size[0]}x{size[1]}, manifest says {resolution}x{resolution}"
    return None
