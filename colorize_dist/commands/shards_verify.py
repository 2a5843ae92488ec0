"""`colorize-dist shards verify`: every shard, image, count and index of a set checked, one line per problem."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Check a shard set against its manifest, changing nothing: every shard is there with its recorded size, its tar
headers read, its DALI index matches, every image has its recorded CRC-32 and decodes at the manifest's resolution;
--deep also re-hashes every shard (SHA-256). Prints a summary.

  colorize-dist shards verify data/shards
  colorize-dist shards verify data/shards --deep

Exit status: 0 all good; 1 some file at fault (each named with its fix); 2 no readable manifest.
"""  # `colorize-dist shards verify --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="shard set directory (holds manifest.json), or its URL")
    parser.add_argument("--deep", action="store_true", help="also re-hash every shard (SHA-256; reads every byte "
                                                            "twice)")


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate
    from tqdm import tqdm

    from colorize_dist.data.manifest import MANIFEST, SPLITS, manifest_shards, read_manifest
    from colorize_dist.data.store import LocalStore, open_store
    from colorize_dist.data.verify import check_remote_shard, check_shard

    store = open_store(args.directory)
    manifest = read_manifest(store)
    problems = []
    listed = set()
    checksums = all("crc32" in entry for split in manifest["splits"].values() for entry in split["shards"])
    rows = []
    for split, summary in manifest["splits"].items():
        shards = manifest_shards(store.root, manifest, split)
        listed.update(shard.path for shard in shards)
        for shard in tqdm(shards, desc=f"verify {split}", unit="shard", leave=False):
            if isinstance(store, LocalStore):
                problems += check_shard(shard, manifest.get("resolution"), store.root, deep=args.deep)
            else:
                problems += check_remote_shard(store, shard, manifest.get("resolution"), deep=args.deep)
        rows.append((split, len(shards), summary["samples"]))
    print(tabulate(rows, headers=("split", "shards", "samples")))
    for split in SPLITS if isinstance(store, LocalStore) else ():  # a web server lists no folders
        for path in sorted((store.root / split).glob("*")):
            if path.suffix == ".tar" and path not in listed:
                problems.append(f"{path}: not listed in {MANIFEST}")
            elif path.suffix == ".partial":
                problems.append(f"{path}: left by an interrupted run; remake the set with --force")
    if not checksums:
        print(f"note: {MANIFEST} records no sizes or checksums (made by an older version), so changed bytes that "
              f"still decode go unnoticed; `colorize-dist shards index {args.directory} --force` records them")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{len(problems)} problem(s) in {store.where}" if problems else f"{store.where}: OK")
    return 1 if problems else 0
