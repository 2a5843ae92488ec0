"""Colorize images of any size with an exported generator; writes DIR/<name>.png for every input.

Each image (grayscale or colour; colour is reduced to its L channel) keeps its size and its full-resolution
lightness. The generator sees L at its training resolution: scaled so the longer side fits, centred and
padded to a square (replicating the border), never stretched. Its ab prediction for the image area is
upsampled bilinearly to the original size, combined with the original L, and each pixel's chroma is reduced
just enough for (L, a, b) to be a displayable sRGB colour, so L and hue survive the conversion to RGB and no
colour clips or wraps. An alpha channel is kept. Unreadable files are reported and skipped (exit status 1).

  colorize-dist colorize --checkpoint runs/00003 photos/ 'scans/*.jpg' old.png --out colorized/
  accelerate launch --num_processes 4 -m colorize_dist colorize --checkpoint FILE photos/ --out DIR  # 4 GPUs
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from colorize_dist.color import AB_SCALE, L_SCALE, L_SHIFT, lab_to_linear_rgb, lab_to_rgb, rgb_to_lab
from colorize_dist.data.images import to_8bit
from colorize_dist.eval.metrics import colorize_batch
from colorize_dist.models.export import load_generator, resolve_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GAMUT_STEPS = 10  # bisection steps on the chroma scale: within 110 / 2^10 ≈ 0.1 of the gamut boundary
GAMUT_TOLERANCE = 1e-4  # linear RGB may exceed [0, 1] by float rounding


@dataclass(frozen=True)
class Job:
    source: Path
    output: Path


@dataclass
class Picture:
    rgb: np.ndarray  # (H, W, 3) uint8
    alpha: np.ndarray | None  # (H, W) uint8, or None when the input has no transparency


def fit_into_square(l: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(1, 1, H, W) → (1, 1, size, size): scaled to fit with the aspect kept, centred, border replicated.

    Also returns the image's box (top, left, height, width) in the square.
    """
    height, width = l.shape[-2:]
    scale = size / max(height, width)
    inner_h, inner_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(l, size=(inner_h, inner_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    padded = F.pad(resized, (left, size - inner_w - left, top, size - inner_h - top), mode="replicate")
    return padded, (top, left, inner_h, inner_w)


def clamp_to_srgb_gamut(lab: torch.Tensor) -> torch.Tensor:
    """Scale each pixel's chroma (a, b) toward gray just enough that (L, a, b) is inside sRGB; L and hue are kept.

    lab: (N, 3, H, W) float32 CIELAB; returns a new tensor. Clipping RGB instead would change lightness.
    """
    pixels = lab.permute(0, 2, 3, 1).reshape(-1, 3).clone()
    outside = ~_in_srgb_gamut(pixels)
    if outside.any():
        chosen = pixels[outside]
        low, high = torch.zeros(len(chosen), device=lab.device), torch.ones(len(chosen), device=lab.device)
        for _ in range(GAMUT_STEPS):  # gray (scale 0) is inside; find the largest inside scale
            middle = (low + high) / 2
            inside = _in_srgb_gamut(torch.cat([chosen[:, :1], chosen[:, 1:] * middle[:, None]], dim=1))
            low, high = torch.where(inside, middle, low), torch.where(inside, high, middle)
        chosen[:, 1:] *= low[:, None]
        pixels[outside] = chosen
    n, _, h, w = lab.shape
    return pixels.reshape(n, h, w, 3).permute(0, 3, 1, 2).contiguous()


def _in_srgb_gamut(pixels: torch.Tensor) -> torch.Tensor:
    """(P, 3) Lab → (P,) bool: its linear sRGB lies in [0, 1]."""
    linear = lab_to_linear_rgb(pixels.T[None, :, :, None])[0, :, :, 0].T
    return ((linear >= -GAMUT_TOLERANCE) & (linear <= 1.0 + GAMUT_TOLERANCE)).all(dim=1)


def colorize_images(generator: nn.Module, resolution: int, images: list[np.ndarray],
                    device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Colourised uint8 RGB (H, W, 3) of each uint8 RGB (H, W, 3) image, any size; one generator batch for all."""
    device = torch.device(device)
    lightness = [rgb_to_lab(torch.from_numpy(np.ascontiguousarray(rgb))[None].to(device))[:, :1] for rgb in images]
    fitted = [fit_into_square(l * L_SCALE + L_SHIFT, resolution) for l in lightness]
    with torch.no_grad():
        ab_small = colorize_batch(generator, torch.cat([square for square, _ in fitted]))[0][:, 1:]
    colourised = []
    for l, ab, (_, (top, left, inner_h, inner_w)) in zip(lightness, ab_small, fitted, strict=True):
        ab = F.interpolate(ab[None, :, top:top + inner_h, left:left + inner_w], size=l.shape[-2:],
                           mode="bilinear", align_corners=False)
        lab = clamp_to_srgb_gamut(torch.cat([l, ab / AB_SCALE], dim=1))
        colourised.append(lab_to_rgb(lab, dtype=torch.uint8)[0].permute(1, 2, 0).contiguous().cpu().numpy())
    return colourised


def read_picture(path: Path) -> Picture:
    """The image at `path` as 8-bit RGB (+ alpha if it has one), upright per its EXIF orientation; 16-bit
    images are scaled to 8 bits, not clipped (a 16-bit gray PNG used to come out pure white)."""
    with Image.open(path) as image:
        image = to_8bit(ImageOps.exif_transpose(image))
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        alpha = np.asarray(image.getchannel("A")) if "A" in image.getbands() else None
        return Picture(rgb=np.array(image.convert("RGB")), alpha=alpha)


def write_picture(path: Path, rgb: np.ndarray, alpha: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rgb if alpha is None else np.dstack([rgb, alpha])
    Image.fromarray(pixels).save(path)


def collect_jobs(inputs: list[str], out_dir: Path) -> tuple[list[Job], list[str]]:
    """(one job per input image, problems to report): folders recurse, globs expand, outputs mirror folders."""
    jobs: dict[Path, Job] = {}
    problems = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            pairs = [(p, p.relative_to(path)) for p in found]
        elif any(char in item for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            pairs = [(p, Path(p.name)) for p in found]
        else:
            pairs = [(path, Path(path.name))]  # a missing file is reported when it is read
        if not pairs:
            problems.append(f"{item}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
        for source, relative in pairs:
            output = out_dir / relative.with_suffix(".png")
            if output in jobs and jobs[output].source != source:
                problems.append(f"{source}: skipped, {jobs[output].source} is also written to {output}; "
                                "colorize them into separate --out folders")
                continue
            jobs[output] = Job(source, output)
    return list(jobs.values()), problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    parser.add_argument("--checkpoint", required=True,
                        help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (PNG files)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generator batch (default 8)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also write <name>_side_by_side.png: the input next to its colourisation")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise SystemExit("colorize: --batch-size must be at least 1")
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        generator, _, resolution = load_generator(resolve_checkpoint(args.checkpoint), device=state.device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"colorize: {exc}") from None
    jobs, problems = collect_jobs(args.inputs, args.out)
    if state.is_main_process:
        for problem in problems:
            print(f"colorize: {problem}", file=sys.stderr)
    written = 0
    with state.split_between_processes(jobs) as my_jobs:
        progress = tqdm(total=len(my_jobs), desc="colorize", unit="img", disable=not state.is_main_process)
        for batch, unreadable in _readable_batches(my_jobs, args.batch_size):
            problems += unreadable
            for message in unreadable:
                print(f"colorize: {message}", file=sys.stderr)
            colourised = colorize_images(generator, resolution, [picture.rgb for _, picture in batch],
                                         state.device) if batch else []
            for (job, picture), rgb in zip(batch, colourised, strict=True):
                write_picture(job.output, rgb, picture.alpha)
                if args.side_by_side:
                    write_picture(job.output.with_name(f"{job.output.stem}_side_by_side.png"),
                                  np.hstack([picture.rgb, rgb]), None if picture.alpha is None
                                  else np.hstack([picture.alpha, picture.alpha]))
            written += len(batch)
            progress.update(len(batch) + len(unreadable))
        progress.close()
    print(f"colorize: rank {state.process_index}: wrote {written} images to {args.out}"
          + (f", skipped {len(problems)}" if problems else ""))
    return 1 if problems else 0


def _readable_batches(jobs: list[Job], batch_size: int) -> Iterator[tuple[list[tuple[Job, Picture]], list[str]]]:
    """Batches of decoded pictures, each with the messages for the files that could not be read on the way."""
    batch, unreadable = [], []
    for job in jobs:
        try:
            batch.append((job, read_picture(job.source)))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            unreadable.append(f"skipping {job.source}: {exc}; check that it is an image file")
        if len(batch) == batch_size:
            yield batch, unreadable
            batch, unreadable = [], []
    if batch or unreadable:
        yield batch, unreadable
