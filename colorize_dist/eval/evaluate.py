"""Evaluate an exported generator on a shard set: prints a table, writes metrics.json, the evaluation card
(card.json, card.md) and samples.png; or compares two cards.

Metrics are those of `colorize_dist.eval.metrics`: PSNR/SSIM in Lab, ab and RGB, ΔE (CIEDE2000),
colourfulness and the gray baseline; LPIPS with --lpips-weights; FID, KID and Inception Score with
--fid-weights. The card (`colorize_dist.eval.card`) fixes the protocol and gives every per-image metric
with its 95 % bootstrap interval, FID with its jackknife standard error, and the figures per skin-tone
stratum. Under `accelerate launch` every process scores its share of the images; the sums are reduced and
the per-image values and Inception outputs gathered to rank 0, so N processes give the same numbers as one.

  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards
  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards --fid-weights --lpips-weights \
      --fid-reference val_ref.npz
  colorize-dist eval --compare runs/00003 runs/00004   # RUN/eval/card.json of each; refuses other protocols
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m colorize_dist eval --checkpoint FILE --shards DIR  # 2 CPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.manifest import read_manifest
from colorize_dist.eval import card, fid
from colorize_dist.eval.lpips import LPIPS_NET, LPIPS_WEIGHTS_FILENAME, lpips_weights_path
from colorize_dist.eval.metrics import evaluate
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.files import atomic_write, first_line, sha256_of, writable_directory
from colorize_dist.models.export import load_generator, resolve_checkpoint

SAMPLE_IMAGES = 8  # rows of samples.png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint",
                        help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    parser.add_argument("--shards", help="shard set directory (from `colorize-dist shards ...`)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two evaluation cards (card.json, its folder or the run directory) side by "
                             "side instead of evaluating; refused when their protocols differ")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="which split to score (default val)")
    parser.add_argument("--fid-weights", nargs="?", const=str(fid.fid_weights_path()), metavar="PATH",
                        help="compute FID, KID and Inception Score with pytorch-fid's Inception weights at PATH "
                             f"(no PATH: the torch hub cache, $TORCH_HOME/hub/checkpoints/{fid.FID_WEIGHTS_FILENAME})")
    parser.add_argument("--fid-reference", metavar="NPZ",
                        help="ground-truth Inception statistics and features: reused if the file exists, else "
                             "computed and saved")
    parser.add_argument("--min-fid-images", type=int, default=fid.MIN_IMAGES, metavar="N",
                        help=f"refuse FID/KID/IS over fewer images (default {fid.MIN_IMAGES}, the feature "
                             "dimension; lower it only for smoke tests)")
    parser.add_argument("--lpips-weights", nargs="?", const=str(lpips_weights_path()), metavar="PATH",
                        help="compute LPIPS with torchvision's AlexNet weights at PATH "
                             f"(no PATH: the torch hub cache, $TORCH_HOME/hub/checkpoints/{LPIPS_WEIGHTS_FILENAME})")
    parser.add_argument("--min-stratum-images", type=int, default=card.MIN_STRATUM_IMAGES, metavar="N",
                        help="skin-tone strata with fewer images take no part in the largest gap between strata "
                             f"(default {card.MIN_STRATUM_IMAGES}; part of the card's protocol)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default 32)")
    parser.add_argument("--backend", default="auto", choices=("auto", "dali", "reference"), help="data loader")
    parser.add_argument("--out", type=Path,
                        help="folder for metrics.json, card.json, card.md and samples.png (default: eval/ in the "
                             "run directory)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")


def main(args: argparse.Namespace) -> int:
    if args.compare is not None:
        return compare(*args.compare)
    if args.checkpoint is None or args.shards is None:
        print("eval: --checkpoint and --shards are required (or --compare A B to compare two cards)", file=sys.stderr)
        return 2
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        out = writable_directory(args.out or _run_dir(Path(args.checkpoint), checkpoint) / "eval",
                                 "--out" if args.out else "eval's output folder")  # before an hour of scoring
        generator, generator_cfg, resolution = load_generator(checkpoint, device=state.device)
        cfg = DataConfig(shards=args.shards, resolution=resolution, backend=args.backend,
                         num_threads=max(1, min(4, (os.cpu_count() or 1) // state.num_processes)))
        loader = build_loader(cfg, args.split, batch_size=args.batch_size, rank=state.process_index,
                              world_size=state.num_processes, device=state.device, augment=False)
        images = loader.samples
        if args.fid_weights is not None and images < args.min_fid_images:
            raise ValueError(f"FID/KID/IS need at least {args.min_fid_images:,} images (--min-fid-images), the "
                             f"{args.split} split has {images:,}; score a larger split or leave out --fid-weights")
        evaluation = evaluate(generator, loader, device=state.device, fid_weights=args.fid_weights,
                              fid_reference=args.fid_reference, lpips_weights=args.lpips_weights,
                              fid_standard_error=args.fid_weights is not None, progress=state.is_main_process)
    except (OSError, ValueError) as exc:
        print(f"eval: {first_line(exc)}", file=sys.stderr)
        return 2
    if state.is_main_process:
        metrics = evaluation.metrics
        report = {"checkpoint": str(checkpoint), "shards": str(args.shards), "split": args.split, "images": images,
                  "resolution": resolution, "processes": state.num_processes, "metrics": metrics,
                  "delta_e": "CIEDE2000 (k_L = k_C = k_H = 1), mean over pixels, then over images"}
        if args.lpips_weights is not None:
            report["lpips"] = {"net": LPIPS_NET, "version": "0.1 (torchmetrics' linear layers)",
                               "weights": str(lpips_weights_path(args.lpips_weights).resolve())}
        if args.fid_weights is not None:
            report["inception"] = inception_report(args, images)
        atomic_write(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        evaluation_card = card.build_card(
            protocol=card.protocol(shards=args.shards, split=args.split, images=images, resolution=resolution,
                                   resize_filter=loader.resize_filter,
                                   metrics=list(evaluation.per_image), lpips_weights=args.lpips_weights,
                                   fid_weights=args.fid_weights, fid_reference=args.fid_reference,
                                   min_stratum_images=args.min_stratum_images),
            summary=card.summarise(evaluation.per_image, evaluation.ita, args.min_stratum_images),
            metrics=metrics, fid_se=evaluation.fid_se,
            model={"checkpoint": str(checkpoint), "sha256": sha256_of(checkpoint),
                   "generator_config": dataclasses.asdict(generator_cfg)},
            run={"processes": state.num_processes, "device": str(state.device), "loader": loader.describe(),
                 "batch_size": args.batch_size},
            warnings=[warning] if args.fid_weights and (warning := fid.sample_size_warning(images)) else [])
        card_json, card_md = card.write_card(evaluation_card, out)
        save_grid(sample_grid(generator, next(loader.epoch(0)), max_images=SAMPLE_IMAGES), out / "samples.png")
        print(card.results_table(evaluation_card))
        print(card.strata_line(evaluation_card))
        print(f"eval: {images} images; wrote {out / 'metrics.json'}, {card_json}, {card_md} and "
              f"{out / 'samples.png'}")
    state.wait_for_everyone()
    return 0


def compare(first: str, second: str) -> int:
    """Print two cards side by side; status 2, with one line naming the first difference, if their protocols differ."""
    try:
        cards = card.load_card(first), card.load_card(second)
    except card.CardError as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    difference = card.first_difference(*cards)
    if difference is not None:
        print(f"eval: the cards' protocols differ at {difference}; their numbers are not comparable: evaluate both "
              "with the same shard set, split, resolution, metrics and weights", file=sys.stderr)
        return 2
    print(card.comparison(*cards, names=(first, second)))
    return 0


def inception_report(args: argparse.Namespace, images: int) -> dict:
    """How FID, KID and IS were computed, for metrics.json: N, weights, resize filter, JPEG, protocol."""
    image_format = read_manifest(args.shards).get("image_format")
    return {
        "images": images,
        **fid.weights_info(args.fid_weights),
        "resize": fid.RESIZE_FILTER,
        "jpeg_compressed": {"predictions": False,  # quantised to 8 bits, never JPEG-encoded
                            "ground_truth": {"jpg": True, "png": False}.get(image_format)},  # None: unknown
        "ground_truth_format": image_format,
        "reference": args.fid_reference,
        "kid": {"kernel": "(x·y/2048 + 1)^3", "subsets": fid.KID_SUBSETS,
                "subset_size": min(fid.KID_SUBSET_SIZE, images), "seed": fid.SEED},
        "inception_score": {"logits": "pool · W^T (no bias)", "splits": min(fid.IS_SPLITS, images),
                            "seed": fid.SEED},
        "warning": fid.sample_size_warning(images),
    }


def _run_dir(given: Path, checkpoint: Path) -> Path:
    """The run directory when one was given (or the file is RUN/export/...), else the file's folder."""
    if given.is_dir():
        return given
    return checkpoint.parent.parent if checkpoint.parent.name == "export" else checkpoint.parent
