"""Colorize images of any size with an exported generator, keeping their full-resolution lightness.

The generator sees L at its training resolution, letterboxed (never stretched) as in training; its ab is upsampled
and each pixel's chroma reduced just enough to be displayable sRGB, so L and hue survive and nothing clips. The
full-resolution work runs in bands of whole rows of at most --max-pixels pixels; every step is per pixel or per
row and column, so banded output is identical to a single band.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from colorize_dist.color import denormalise_ab, lab_to_linear_rgb, lab_to_rgb, normalise_l, rgb_to_lab
from colorize_dist.data.images import to_8bit
from colorize_dist.eval.metrics import colorize_batch
from colorize_dist.eval.names import DEFAULT_MAX_PIXELS
from colorize_dist.files import atomic_path

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


def row_bands(height: int, width: int, max_pixels: int) -> list[tuple[int, int]]:
    """[start, stop) rows of the bands that cover an image, each of at most `max_pixels` pixels (at least one row)."""
    rows = max(1, max_pixels // width)
    return [(start, min(start + rows, height)) for start in range(0, height, rows)]


def model_input(rgb: np.ndarray, size: int, max_pixels: int,
                device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Normalised L (1, 1, size, size) of uint8 RGB (H, W, 3): scaled to fit with the aspect kept (bilinear,
    antialiased: along rows band by band, then along columns), centred, border replicated.

    Also returns the image's box (top, left, height, width) in the square.
    """
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    inner_h, inner_w = max(1, round(height * scale)), max(1, round(width * scale))
    narrowed = torch.cat([_resize(normalise_l(_lightness(rgb[start:stop], device)), stop - start, inner_w)
                          for start, stop in row_bands(height, width, max_pixels)], dim=2)
    resized = _resize(narrowed, inner_h, inner_w)
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    padded = F.pad(resized, (left, size - inner_w - left, top, size - inner_h - top), mode="replicate")
    return padded, (top, left, inner_h, inner_w)


def _lightness(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """CIELAB L (1, 1, h, w) float32 of uint8 RGB rows (h, w, 3)."""
    return rgb_to_lab(torch.from_numpy(np.ascontiguousarray(rgb))[None].to(device))[:, :1]


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def _bilinear_taps(source: int, target: int, start: int, stop: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first index, second index, weight of the second) into `source` samples of target samples start..stop−1,
    as `F.interpolate(mode="bilinear", align_corners=False)` places them (clamped at the borders)."""
    position = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * (source / target) - 0.5).clamp(min=0.0)
    first = position.floor().long().clamp(max=source - 1)
    second = (first + 1).clamp(max=source - 1)
    return first.to(device), second.to(device), (position - first).float().to(device)


def render(rgb: np.ndarray, ab: torch.Tensor, max_pixels: int, device: torch.device) -> np.ndarray:
    """uint8 RGB (H, W, 3): the image's own L with the prediction `ab` (1, 2, h, w, normalised) upsampled
    bilinearly to H × W and mapped into the sRGB gamut, computed in bands of at most `max_pixels` pixels."""
    height, width = rgb.shape[:2]
    out = np.empty((height, width, 3), dtype=np.uint8)
    x0, x1, wx = _bilinear_taps(ab.shape[-1], width, 0, width, device)
    for start, stop in row_bands(height, width, max_pixels):
        y0, y1, wy = _bilinear_taps(ab.shape[-2], height, start, stop, device)
        rows = ab[:, :, y0] * (1 - wy)[:, None] + ab[:, :, y1] * wy[:, None]
        band_ab = rows[..., x0] * (1 - wx) + rows[..., x1] * wx
        lab = clamp_to_srgb_gamut(torch.cat([_lightness(rgb[start:stop], device), denormalise_ab(band_ab)], dim=1))
        out[start:stop] = lab_to_rgb(lab, dtype=torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    return out


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


def colorize_images(generator: Callable[[torch.Tensor], torch.Tensor], resolution: int, images: list[np.ndarray],
                    device: torch.device | str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Colourised uint8 RGB (H, W, 3) of each uint8 RGB (H, W, 3) image, any size; one generator batch for all.

    `generator`: a PyTorch generator or an `OnnxGenerator`; the full-resolution work runs in bands of at most
    `max_pixels` pixels.
    """
    device = torch.device(device)
    fitted = [model_input(rgb, resolution, max_pixels, device) for rgb in images]
    with torch.no_grad():
        ab_small = colorize_batch(generator, torch.cat([square for square, _ in fitted]))[0][:, 1:]
    return [render(rgb, ab[None, :, top:top + inner_h, left:left + inner_w], max_pixels, device)
            for rgb, ab, (_, (top, left, inner_h, inner_w)) in zip(images, ab_small, fitted, strict=True)]


def read_picture(path: Path) -> Picture:
    """The image at `path` as 8-bit RGB (+ alpha if it has one), upright per its EXIF orientation; 16-bit
    images are scaled to 8 bits, not clipped (a 16-bit gray PNG used to come out pure white)."""
    with Image.open(path) as image:
        image = to_8bit(ImageOps.exif_transpose(image))
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        alpha = np.asarray(image.getchannel("A")) if "A" in image.getbands() else None
        return Picture(rgb=np.array(image if image.mode == "RGB" else image.convert("RGB")), alpha=alpha)


def write_picture(path: Path, rgb: np.ndarray, alpha: np.ndarray | None) -> None:
    """Write the PNG atomically: an interrupted run leaves no truncated image under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rgb if alpha is None else np.dstack([rgb, alpha])
    with atomic_path(path) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")


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


def readable_batches(jobs: list[Job], batch_size: int) -> Iterator[tuple[list[tuple[Job, Picture]], list[str]]]:
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
