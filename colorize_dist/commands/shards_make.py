"""`colorize-dist shards make`, and the writer options `shards synth` shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.data.options import GRAY_RESIDUAL_CHROMA, IMAGE_FORMATS, ShardError, ShardOptions, SkipRules

DESCRIPTION = """\
Make WebDataset shards from a folder, .zip or .tar of images, for training and evaluation.

Each image is centre-cropped to a square, resized to RESOLUTION² and stored as baseline JPEG (or PNG;
--keep-original keeps its bytes). Writes OUT/train/*.tar and OUT/val/*.tar (--val-fraction of the images; 1 makes a
test set), a DALI index beside each shard and OUT/manifest.json.
Skipped and listed with the reason: unreadable files, images with a shorter side under --min-size (default
RESOLUTION / 2) and grayscale or toned images (--keep-gray keeps them); faintly coloured ones are kept and listed for
review; both are drawn with their scores on OUT/contact_sheet.png.

  colorize-dist shards make photos/ data/shards --resolution 256
  colorize-dist shards make ffhq.zip data/ffhq --resolution 1024 --val-fraction 0.02

A full disk stops the run with one line naming the folder and the space needed; complete shards stay, and
`shards verify` says to remake the set.
"""  # `colorize-dist shards make --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="folder (searched recursively), .zip or .tar of images")
    parser.add_argument("out", type=Path, help="shard set directory to create")
    parser.add_argument("--resolution", type=int, help="side of the square images (required unless --keep-original)")
    add_writer_arguments(parser)
    parser.add_argument("--keep-original", action="store_true", help="store each file's bytes unchanged")
    parser.add_argument("--keep-gray", action="store_true",
                        help=f"keep images that are already grayscale or toned (residual chroma under "
                             f"{GRAY_RESIDUAL_CHROMA:g}); skipped by default")
    parser.add_argument("--min-size", type=int,
                        help="skip images whose shorter side is under this many pixels (default: RESOLUTION / 2; "
                             "none with --keep-original)")


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `shards make` and `shards synth`; `writer_options` turns them into ShardOptions."""
    defaults = ShardOptions()
    parser.add_argument("--format", choices=IMAGE_FORMATS, default=defaults.image_format,
                        help="stored image format: jpg (baseline JPEG, decoded on a GPU's hardware decoder by "
                             "DALI) or png (lossless, but DALI decodes PNG on the CPU even on a GPU)")
    parser.add_argument("--quality", type=int, default=defaults.quality, help="JPEG quality (1-100)")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of images in val/ (1: a test set, no train/ images)")
    parser.add_argument("--workers", type=int, help="encoding processes (default: one per CPU core)")
    parser.add_argument("--force", action="store_true", help="replace the shards of an existing OUT")


def writer_options(args: argparse.Namespace) -> ShardOptions:
    return ShardOptions(image_format=args.format, quality=args.quality, shard_size=args.shard_size,
                        val_fraction=args.val_fraction, workers=args.workers, force=args.force)


def main(args: argparse.Namespace) -> int:
    from colorize_dist.data.make import make_shards

    if args.resolution is None and not args.keep_original:
        raise ShardError("--resolution is required (or pass --keep-original)")
    make_shards(args.source, args.out, resolution=None if args.keep_original else args.resolution,
                options=writer_options(args), rules=SkipRules(keep_gray=args.keep_gray, min_size=args.min_size))
    return 0
