"""`colorize-dist shards index`: a manifest and .idx files for shards written by other tools."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Index WebDataset shards written by other tools so the loaders read them. Expects DIR/train/*.tar, DIR/val/*.tar
or both; writes a DALI index beside each tar and DIR/manifest.json (sample counts, sizes, SHA-256, CRC-32 of each
image: index only shards you trust). Images are used at the size they are stored; shards should be pre-shuffled.

--repair rewrites missing or stale .idx files of a set that has a manifest (only for shards that still match it);
--force replaces the manifest, or adopts the complete shards of an interrupted `shards make`.

  colorize-dist shards index data/my_shards
  colorize-dist shards index data/my_shards --repair
"""  # `colorize-dist shards index --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="directory holding train/*.tar and val/*.tar")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--force", action="store_true", help="replace an existing manifest")
    action.add_argument("--repair", action="store_true",
                        help="rewrite missing or stale .idx files of the shards the manifest lists (bytes checked)")


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from colorize_dist.data.index import index_shards, repair_indexes

    if args.repair:
        repaired = repair_indexes(args.directory)
        print(f"rewrote {len(repaired)} index file(s)" + "".join(f"\n  {path}" for path in repaired))
        return 0
    manifest = index_shards(args.directory, force=args.force)
    rows = [(split, summary["samples"], len(summary["shards"])) for split, summary in manifest["splits"].items()]
    print(tabulate(rows, headers=("split", "images", "shards")))
    return 0
