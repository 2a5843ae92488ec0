"""Evaluate an exported generator on a shard set: prints a table, writes metrics.json and samples.png.

Metrics are those of `colorize_dist.eval.metrics`: PSNR/SSIM in Lab, ab and RGB, ΔE (CIEDE2000),
colourfulness and the gray baseline; LPIPS with --lpips-weights; FID, KID and Inception Score with
--fid-weights. Under `accelerate launch` every process scores its share of the images and the sums are
reduced (the Inception outputs gathered), so N processes give the same numbers as one.

  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards
  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards --fid-weights --lpips-weights \
      --fid-reference val_ref.npz
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m colorize_dist eval --checkpoint FILE --shards DIR  # 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.manifest import read_manifest
from colorize_dist.eval import fid
from colorize_dist.eval.lpips import LPIPS_NET, LPIPS_WEIGHTS_FILENAME, lpips_weights_path
from colorize_dist.eval.metrics import compute_metrics
from colorize_dist.eval.names import LABELS
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.files import atomic_write, first_line
from colorize_dist.models.export import load_generator, resolve_checkpoint

SAMPLE_IMAGES = 8  # rows of samples.png


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(LABELS[name]) for name in metrics)
    return "\n".join(f"{LABELS[name]:<{width}}  {value:10.4f}" for name, value in metrics.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    parser.add_argument("--shards", required=True, help="shard set directory (from `colorize-dist shards ...`)")
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
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch and process (default 32)")
    parser.add_argument("--backend", default="auto", choices=("auto", "dali", "reference"), help="data loader")
    parser.add_argument("--out", type=Path,
                        help="folder for metrics.json and samples.png (default: eval/ in the run directory)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")


def main(args: argparse.Namespace) -> int:
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        generator, _, resolution = load_generator(checkpoint, device=state.device)
        cfg = DataConfig(shards=args.shards, resolution=resolution, backend=args.backend,
                         num_threads=max(1, min(4, (os.cpu_count() or 1) // state.num_processes)))
        loader = build_loader(cfg, args.split, batch_size=args.batch_size, rank=state.process_index,
                              world_size=state.num_processes, device=state.device)
        images = loader.ranks.total
        if args.fid_weights is not None and images < args.min_fid_images:
            raise ValueError(f"FID/KID/IS need at least {args.min_fid_images:,} images (--min-fid-images), the "
                             f"{args.split} split has {images:,}; score a larger split or leave out --fid-weights")
        metrics = compute_metrics(generator, loader, device=state.device, fid_weights=args.fid_weights,
                                  fid_reference=args.fid_reference, lpips_weights=args.lpips_weights,
                                  progress=state.is_main_process)
    except (OSError, ValueError) as exc:
        print(f"eval: {first_line(exc)}", file=sys.stderr)
        return 2
    if state.is_main_process:
        out = args.out or _run_dir(Path(args.checkpoint), checkpoint) / "eval"
        report = {"checkpoint": str(checkpoint), "shards": str(args.shards), "split": args.split, "images": images,
                  "resolution": resolution, "processes": state.num_processes, "metrics": metrics,
                  "delta_e": "CIEDE2000 (k_L = k_C = k_H = 1), mean over pixels, then over images"}
        if args.lpips_weights is not None:
            report["lpips"] = {"net": LPIPS_NET, "version": "0.1 (torchmetrics' linear layers)",
                               "weights": str(lpips_weights_path(args.lpips_weights).resolve())}
        if args.fid_weights is not None:
            report["inception"] = inception_report(args, images)
        atomic_write(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        save_grid(sample_grid(generator, next(loader.epoch(0)), max_images=SAMPLE_IMAGES), out / "samples.png")
        print(format_table(metrics))
        print(f"eval: {images} images; wrote {out / 'metrics.json'} and {out / 'samples.png'}")
    state.wait_for_everyone()
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
