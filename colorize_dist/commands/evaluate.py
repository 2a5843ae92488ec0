"""`colorize-dist eval`: score an exported generator on a shard set, write its evaluation card."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.eval.names import MIN_STRATUM_IMAGES, REGIONS
from colorize_dist.files import first_line

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
    import numpy as np
    import torch
    from accelerate import PartialState

    from colorize_dist.data import DataConfig, build_loader
    from colorize_dist.data.store import redact
    from colorize_dist.eval import card, fid
    from colorize_dist.eval.evaluate import (
        SAMPLE_IMAGES,
        inception_report,
        read_groups,
        resize_done,
        run_dir_of,
        split_keys,
        training_mean_ab,
        training_shards,
    )
    from colorize_dist.eval.lpips import LPIPS_NET, lpips_weights_path
    from colorize_dist.eval.metrics import evaluate
    from colorize_dist.eval.samples import sample_grid, save_grid
    from colorize_dist.files import atomic_write, sha256_of, writable_directory
    from colorize_dist.models.export import load_generator, resolve_checkpoint

    fid_weights = str(fid.fid_weights_path()) if args.fid_weights == HUB_CACHE else args.fid_weights
    lpips_weights = str(lpips_weights_path()) if args.lpips_weights == HUB_CACHE else args.lpips_weights
    min_fid_images = fid.MIN_IMAGES if args.min_fid_images is None else args.min_fid_images
    if args.compare is not None:
        return compare(*args.compare)
    if args.checkpoint is None or args.shards is None:
        raise UserError("--checkpoint and --shards are required (or --compare A B to compare two cards)")
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        out = writable_directory(args.out or run_dir_of(Path(args.checkpoint), checkpoint) / "eval",
                                 "--out" if args.out else "eval's output folder")  # before an hour of scoring
        generator, generator_cfg, resolution = load_generator(checkpoint, device=state.device)
        cfg = DataConfig(shards=args.shards, resolution=resolution, backend=args.backend,
                         num_threads=max(1, min(4, (os.cpu_count() or 1) // state.num_processes)))
        loader = build_loader(cfg, args.split, batch_size=args.batch_size, rank=state.process_index,
                              world_size=state.num_processes, device=state.device, augment=False)
        images = loader.samples
        if fid_weights is not None and images < min_fid_images:
            raise ValueError(f"FID/KID/IS need at least {min_fid_images:,} images (--min-fid-images), the "
                             f"{args.split} split has {images:,}; score a larger split or leave out --fid-weights")
        keys = split_keys(args.shards, loader)
        groups = read_groups(args.groups, keys) if args.groups is not None else None
        mean_ab = training_mean_ab(args.train_shards or training_shards(Path(args.checkpoint), checkpoint)
                                   or args.shards)
        evaluation = evaluate(generator, loader, device=state.device, fid_weights=fid_weights,
                              fid_reference=args.fid_reference, lpips_weights=lpips_weights,
                              fid_standard_error=fid_weights is not None, mean_ab=mean_ab.get("ab"),
                              skin_region=args.skin_region, progress=state.is_main_process)
    except (OSError, ValueError) as exc:  # UserErrors among them, and the files' own errors
        raise UserError(first_line(exc)) from exc
    if state.is_main_process:
        metrics = evaluation.metrics
        report = {"checkpoint": str(checkpoint), "shards": redact(str(args.shards)), "split": args.split,
                  "images": images, "resolution": resolution, "processes": state.num_processes, "metrics": metrics,
                  "delta_e": "CIEDE2000 (k_L = k_C = k_H = 1), mean over pixels, then over images"}
        if lpips_weights is not None:
            report["lpips"] = {"net": LPIPS_NET, "version": "0.1 (torchmetrics' linear layers)",
                               "weights": str(lpips_weights_path(lpips_weights).resolve())}
        if fid_weights is not None:
            report["inception"] = inception_report(args.shards, fid_weights, args.fid_reference, images)
        atomic_write(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        stratified = (card.Strata.from_groups(keys, groups) if groups is not None
                      else card.Strata.from_ita(evaluation.ita))
        summary = card.summarise(evaluation.per_image, stratified, args.min_stratum_images, evaluation.baselines)
        summary["skin_estimate"] = {"region": args.skin_region,
                                    "pixels_median": float(np.median(evaluation.skin["pixels"])),
                                    "fraction_median": float(np.median(evaluation.skin["fraction"])),
                                    "undetermined": int(np.isnan(evaluation.ita).sum())}
        card.write_per_image(out / card.PER_IMAGE_CSV, keys, {
            "stratum": stratified.labels, "ita": evaluation.ita, "skin_pixels": evaluation.skin["pixels"],
            "skin_fraction": evaluation.skin["fraction"], **evaluation.per_image,
            **{f"{baseline}:{name}": values for baseline, scores in evaluation.baselines.items()
               for name, values in scores.items()}})
        evaluation_card = card.build_card(
            protocol=card.protocol(shards=args.shards, split=args.split, images=images, resolution=resolution,
                                   resize_filter=resize_done(args.shards, resolution, loader.resize_filter),
                                   metrics=list(evaluation.per_image), lpips_weights=lpips_weights,
                                   fid_weights=fid_weights, fid_reference=args.fid_reference,
                                   min_stratum_images=args.min_stratum_images, skin_region=args.skin_region,
                                   groups=args.groups),
            summary=summary, baselines={"gray": {"ab": [0.0, 0.0]}, "mean_ab": mean_ab},
            metrics=metrics, fid_se=evaluation.fid_se,
            model={"checkpoint": str(checkpoint), "sha256": sha256_of(checkpoint),
                   "generator_config": dataclasses.asdict(generator_cfg)},
            run={"processes": state.num_processes, "device": str(state.device), "loader": loader.describe(),
                 "batch_size": args.batch_size},
            warnings=[warning] if fid_weights and (warning := fid.sample_size_warning(images)) else [])
        card_json, card_md = card.write_card(evaluation_card, out)
        save_grid(sample_grid(generator, next(loader.epoch(0)), max_images=SAMPLE_IMAGES), out / "samples.png")
        print(card.results_table(evaluation_card))
        print(card.baselines_table(evaluation_card))
        print(card.strata_line(evaluation_card))
        print(f"eval: {images} images; wrote {out / 'metrics.json'}, {card_json}, {card_md}, "
              f"{out / card.PER_IMAGE_CSV} and {out / 'samples.png'}")
    state.wait_for_everyone()
    return 0


def compare(first: str, second: str) -> int:
    """Print two cards side by side; a UserError naming the first difference if their protocols differ."""
    from colorize_dist.eval import card
    from colorize_dist.eval.evaluate import paired_comparison

    cards = card.load_card(first), card.load_card(second)
    difference = card.first_difference(*cards)
    if difference is not None:
        raise UserError(f"the cards' protocols differ at {difference}; their numbers are not comparable: evaluate "
                        "both with the same shard set, split, resolution, metrics and weights")
    paired, why = paired_comparison(first, second)
    print(card.comparison(*cards, names=(first, second), paired=paired))
    if paired is None:
        print(f"eval: no paired intervals: {why}", file=sys.stderr)
    return 0
