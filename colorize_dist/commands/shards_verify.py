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

    from colorize_dist.data.manifest import MANIFEST
    from colorize_dist.data.verify import verify_set

    report = verify_set(args.directory, deep=args.deep)
    print(tabulate(report.splits, headers=("split", "shards", "samples")))
    if not report.checksums_recorded:
        print(f"note: {MANIFEST} records no sizes or checksums (made by an older version), so changed bytes that "
              f"still decode go unnoticed; `colorize-dist shards index {args.directory} --force` records them")
    for problem in report.problems:
        print(f"PROBLEM {problem}")
    print(f"{len(report.problems)} problem(s) in {report.where}" if report.problems else f"{report.where}: OK")
    return 1 if report.problems else 0
