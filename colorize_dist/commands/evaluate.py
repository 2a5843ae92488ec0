"""`colorize-dist eval`: score an exported generator on a shard set, write its evaluation card."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.eval.names import MIN_STRATUM_IMAGES, REGIONS

DESCRIPTION = """\
Evaluate an exported generator on a shard set. Prints a table and writes metrics.json, the evaluation card
(card.json, card.md: every metric with its 95 % interval, differences from the gray and mean-ab baselines, figures
per skin-tone stratum or per --groups), per_image.csv and samples.png. Metrics: PSNR/SSIM in Lab, ab and RGB, ΔE
(CIEDE2000), colourfulness; LPIPS with --lpips-weights; FID, KID and Inception Score with --fid-weights.
--compare A B prints A − B with paired intervals on the same images.

  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards
  colorize-dist eval --checkpoint runs/00003 --shards data/test_shards --groups skin_types.csv  # your own strata
  colorize-dist eval --compare runs/00003 runs/00004   # RUN/eval/card.json of each
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m colorize_dist eval --checkpoint FILE --shards DIR  # 2 CPUs
"""  # `colorize-dist eval --help`, for users

HUB_CACHE = ""  # --fid-weights or --lpips-weights without a PATH: the file in the torch hub cache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    parser.add_argument("--shards", help="shard set directory (from `colorize-dist shards ...`)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two evaluation cards (card.json, its folder or the run directory) side by "
                             "side instead of evaluating; refused when their protocols differ")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="which split to score (default val)")
    parser.add_argument("--fid-weights", nargs="?", const=HUB_CACHE, metavar="PATH",
                        help="compute FID, KID and Inception Score with pytorch-fid's Inception weights at PATH "
                             "(no PATH: pytorch-fid's file in the torch hub cache, $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--fid-reference", metavar="NPZ",
                        help="ground-truth Inception statistics and features: reused if the file exists, else "
                             "computed and saved")
    parser.add_argument("--min-fid-images", type=int, metavar="N",
                        help="refuse FID/KID/IS over fewer images (default: the dimension of the Inception "
                             "features, below which their covariance is singular; lower it only for smoke tests)")
    parser.add_argument("--lpips-weights", nargs="?", const=HUB_CACHE, metavar="PATH",
                        help="compute LPIPS with torchvision's AlexNet weights at PATH "
                             "(no PATH: torchvision's file in the torch hub cache, $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--min-stratum-images", type=int, default=MIN_STRATUM_IMAGES, metavar="N",
                        help="skin-tone strata with fewer images take no part in the largest gap between strata "
                             f"(default {MIN_STRATUM_IMAGES}; part of the card's protocol)")
    parser.add_argument("--skin-region", default="face", choices=tuple(REGIONS),
                        help="where the skin-tone strata look for skin: face (the cheeks, nose and mouth of an "
                             "aligned face crop, as CelebA-HQ and FFHQ are; the default) or frame (the whole image, "
                             "for uncropped photos)")
    parser.add_argument("--groups", type=Path, metavar="FILE",
                        help="your own group labels, used for the card's strata and gaps instead of skin tone: a "
                             "CSV (key,group) or a JSON object {key: group}; a key is a sample key or the path of "
                             "the image as `shards make` was given it")
    parser.add_argument("--train-shards", type=Path, metavar="DIR",
                        help="the shard set the model was trained on, whose manifest's train mean ab is the "
                             "mean-ab baseline (default: the run's data.shards when --checkpoint is a run "
                             "directory, else --shards)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default 32)")
    parser.add_argument("--backend", default="auto", choices=("auto", "dali", "reference"),
                        help="data loader (default auto: DALI where installed)")
    parser.add_argument("--out", type=Path,
                        help="folder for metrics.json, card.json, card.md and samples.png (default: eval/ in the "
                             "run directory)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.eval import card, fid
    from colorize_dist.eval.evaluate import evaluate_checkpoint
    from colorize_dist.eval.lpips import lpips_weights_path

    fid_weights = str(fid.fid_weights_path()) if args.fid_weights == HUB_CACHE else args.fid_weights
    lpips_weights = str(lpips_weights_path()) if args.lpips_weights == HUB_CACHE else args.lpips_weights
    min_fid_images = fid.MIN_IMAGES if args.min_fid_images is None else args.min_fid_images
    if args.compare is not None:
        return compare(*args.compare)
    if args.checkpoint is None or args.shards is None:
        raise UserError("--checkpoint and --shards are required (or --compare A B to compare two cards)")
    written = evaluate_checkpoint(
        args.checkpoint, args.shards, split=args.split, out=args.out, batch_size=args.batch_size,
        backend=args.backend, cpu=args.cpu, fid_weights=fid_weights, fid_reference=args.fid_reference,
        min_fid_images=min_fid_images, lpips_weights=lpips_weights, train_shards=args.train_shards,
        groups=args.groups, skin_region=args.skin_region, min_stratum_images=args.min_stratum_images)
    if written is not None:  # the main process
        print(card.results_table(written.card))
        print(card.baselines_table(written.card))
        print(card.strata_line(written.card))
        print(f"eval: {written.images} images; wrote {written.metrics_json}, {written.card_json}, {written.card_md}, "
              f"{written.per_image_csv} and {written.samples_png}")
    return 0


def compare(first: str, second: str) -> int:
    """Print two cards side by side; a UserError naming the first difference if their protocols differ."""
    from colorize_dist.eval.evaluate import compare_cards

    table, unpaired = compare_cards(first, second)
    print(table)
    if unpaired is not None:
        print(f"eval: no paired intervals: {unpaired}", file=sys.stderr)
    return 0
