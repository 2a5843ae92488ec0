"""Evaluate an exported generator on a shard set: prints a table, writes metrics.json and samples.png.

Metrics are those of `colorize_dist.eval.metrics` (PSNR/SSIM in Lab and RGB, colourfulness, gray baseline,
and FID with --fid-weights). Under `accelerate launch` every process scores its share of the images and the
sums are reduced, so N processes give the same numbers as one.

  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards
  colorize-dist eval --checkpoint runs/00003 --shards data/celeba_shards --fid-weights --fid-reference val_ref.npz
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m colorize_dist eval --checkpoint FILE --shards DIR  # 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from colorize_dist.data import Batch, DataConfig, build_loader
from colorize_dist.eval.fid import fid_weights_path
from colorize_dist.eval.metrics import colorize_batch, compute_metrics
from colorize_dist.models.export import load_generator, resolve_checkpoint
from colorize_dist.models.spaces import to_rgb

METRIC_LABELS = {
    "psnr_lab": "PSNR Lab (dB) ↑",
    "ssim_lab": "SSIM Lab ↑",
    "psnr_rgb": "PSNR RGB (dB) ↑",
    "ssim_rgb": "SSIM RGB ↑",
    "psnr_lab_gray": "PSNR Lab, gray baseline (dB)",
    "colorfulness": "colourfulness",
    "colorfulness_real": "colourfulness, ground truth",
    "fid": "FID ↓",
}


def sample_grid(generator: nn.Module, batch: Batch, max_images: int = 8) -> np.ndarray:
    """uint8 (H, W, 3) grid with one row per valid sample: input gray | prediction | ground truth."""
    keep = batch.valid.to(batch.l.device)
    l, ab = batch.l[keep][:max_images].float(), batch.ab[keep][:max_images].float()
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        predicted = colorize_batch(generator, l.to(next(generator.parameters()).device))[1].cpu()
    generator.train(was_training)
    gray = to_rgb(l, torch.zeros_like(ab), "ab")
    rows = torch.stack([gray, predicted, to_rgb(l, ab, "ab")], dim=1).flatten(0, 1)
    grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
    return (grid * 255.0).round().byte().permute(1, 2, 0).numpy()


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(METRIC_LABELS[name]) for name in metrics)
    return "\n".join(f"{METRIC_LABELS[name]:<{width}}  {value:10.4f}" for name, value in metrics.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    parser.add_argument("--shards", required=True, help="shard set directory (from `colorize-dist shards ...`)")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="which split to score (default val)")
    parser.add_argument("--fid-weights", nargs="?", const=str(fid_weights_path()), metavar="PATH",
                        help="compute FID with pytorch-fid's Inception weights at PATH "
                             "(no PATH: the torch hub cache, $TORCH_HOME/hub/checkpoints)")
    parser.add_argument("--fid-reference", metavar="NPZ",
                        help="ground-truth FID statistics: reused if the file exists, else computed and saved")
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
        metrics = compute_metrics(generator, loader, device=state.device, fid_weights=args.fid_weights,
                                  fid_reference=args.fid_reference, progress=state.is_main_process)
    except (OSError, ValueError) as exc:
        print(f"eval: {exc}", file=sys.stderr)
        return 2
    if state.is_main_process:
        out = args.out or _run_dir(Path(args.checkpoint), checkpoint) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({
            "checkpoint": str(checkpoint), "shards": str(args.shards), "split": args.split,
            "images": loader.ranks.total, "resolution": resolution, "processes": state.num_processes,
            "metrics": metrics}, indent=2) + "\n")
        Image.fromarray(sample_grid(generator, next(loader.epoch(0)))).save(out / "samples.png")
        print(format_table(metrics))
        print(f"eval: {loader.ranks.total} images; wrote {out / 'metrics.json'} and {out / 'samples.png'}")
    state.wait_for_everyone()
    return 0


def _run_dir(given: Path, checkpoint: Path) -> Path:
    """The run directory when one was given (or the file is RUN/export/...), else the file's folder."""
    if given.is_dir():
        return given
    return checkpoint.parent.parent if checkpoint.parent.name == "export" else checkpoint.parent
