"""Index WebDataset shards written by other tools (webdataset.ShardWriter, GNU tar) so the loaders read them.

Expects DIR/train/*.tar and optionally DIR/val/*.tar; writes a DALI index beside each tar and
DIR/manifest.json with the image count of each shard. Images are used at whatever size they are stored.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from colorize_dist.data.shards import MANIFEST, SPLITS, Shard, ShardError, count_images, write_index, write_manifest
from colorize_dist.files import first_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="directory holding train/*.tar and val/*.tar")
    parser.add_argument("--force", action="store_true", help=f"replace an existing {MANIFEST}")


def main(args: argparse.Namespace) -> int:
    try:
        manifest = index_shards(args.directory, force=args.force)
    except ShardError as exc:
        print(f"shards index: {first_line(exc)}", file=sys.stderr)
        return 2
    for split, summary in manifest["splits"].items():
        print(f"{split}: {summary['samples']} images in {len(summary['shards'])} shards")
    return 0


def index_shards(directory: Path, *, force: bool = False) -> dict[str, Any]:
    """Write a DALI index beside every tar of `directory`/{train,val} and the manifest; returns the manifest."""
    if (directory / MANIFEST).exists() and not force:
        raise ShardError(f"{directory / MANIFEST} exists; pass --force to replace it")
    tars = {split: sorted((directory / split).glob("*.tar")) for split in SPLITS}
    if not tars["train"]:
        raise ShardError(f"no tar shards in {directory / 'train'}")
    shards = {}
    for split, paths in tars.items():
        shards[split] = []
        for path in tqdm(paths, desc=f"index {split}", unit="shard"):
            try:
                shards[split].append(Shard(path, count_images(write_index(path))))
            except (tarfile.TarError, OSError) as exc:
                raise ShardError(f"{path} is not a readable tar ({exc})") from None
    return write_manifest(directory, shards, source="indexed by `colorize-dist shards index`",
                          resolution=None, image_format="as stored", split_rule="train/ and val/ folders")
