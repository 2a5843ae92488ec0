"""Procedural colour images whose chroma is predictable from luminance structure: the demo's and the tests' data.

Small to make, identical on every machine and learnable: each shape class has its own hue and its own luminance
signature, so the shape seen in L tells the colour and a short training run clearly beats the gray baseline.
Geometry is in [0, 1]² coordinates, so one index gives the same picture at every resolution.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from colorize_dist.data.make import Stored, encode_array, write_shard_set
from colorize_dist.data.options import ShardError, ShardOptions

# Background colour ramp: hue follows luminance.
NAVY = np.array([30.0, 50.0, 125.0])
PEACH = np.array([245.0, 205.0, 150.0])
# Shape palettes (dark end, bright end).
RED = (np.array([120.0, 15.0, 20.0]), np.array([250.0, 110.0, 90.0]))
GREEN = (np.array([20.0, 95.0, 30.0]), np.array([110.0, 215.0, 90.0]))
YELLOW = np.array([250.0, 215.0, 30.0])
PURPLE = np.array([125.0, 45.0, 175.0])
SEED_SALT = 0x5EED_C010  # keeps these streams apart from other users of default_rng(index)


def _disk(dx: np.ndarray, dy: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Red disk, bright at the centre and dark at the rim."""
    radius = np.hypot(dx, dy) / size
    shade = np.clip(1.0 - radius, 0.0, 1.0)[..., None]
    return radius < 1.0, RED[0] + (RED[1] - RED[0]) * shade


def _striped_square(dx: np.ndarray, dy: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Green square with six horizontal stripes alternating dark and light."""
    stripe = (np.floor((dy + size) / (size / 3.0)) % 2)[..., None]
    return np.maximum(np.abs(dx), np.abs(dy)) < size, GREEN[0] + (GREEN[1] - GREEN[0]) * stripe


def _triangle(dx: np.ndarray, dy: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat bright yellow triangle pointing up."""
    mask = (dy < size) & (np.abs(dx) < (dy + size) / 2.0)
    return mask, np.broadcast_to(YELLOW, (*dx.shape, 3))


def _ring(dx: np.ndarray, dy: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat dark purple ring."""
    radius = np.hypot(dx, dy)
    return (radius < size) & (radius > 0.6 * size), np.broadcast_to(PURPLE, (*dx.shape, 3))


SHAPES = (_disk, _striped_square, _triangle, _ring)


def synth_image(index: int, resolution: int) -> np.ndarray:
    """The `index`-th synthetic image as uint8 (resolution, resolution, 3) RGB; same index, same image."""
    if index < 0 or resolution < 1:
        raise ValueError(f"synth_image needs index >= 0 and resolution >= 1, got {index}, {resolution}")
    rng = np.random.default_rng([SEED_SALT, index])
    coords = (np.arange(resolution) + 0.5) / resolution
    y, x = np.meshgrid(coords, coords, indexing="ij")

    angle = rng.uniform(0.0, 2.0 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    ramp = 0.5 + ((x - 0.5) * cos + (y - 0.5) * sin) / (abs(cos) + abs(sin))  # 0..1 corner to corner
    image = NAVY + (PEACH - NAVY) * ramp[..., None]

    for _ in range(rng.integers(2, 5)):
        shape = SHAPES[rng.integers(len(SHAPES))]
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        mask, colour = shape(x - cx, y - cy, rng.uniform(0.08, 0.22))
        image = np.where(mask[..., None], colour, image)
    return np.rint(image).clip(0, 255).astype(np.uint8)


def write_synthetic_shards(out: Path, n: int, resolution: int, *, options: ShardOptions | None = None) -> Path:
    """Images 0..n-1 at `resolution`² as a shard set in `out` (the trainer's default data, the data benchmark)."""
    if n < 1 or resolution < 1:
        raise ShardError("--n and --resolution must be at least 1")
    options = options or ShardOptions()
    encode = functools.partial(encode_synth, resolution=resolution, image_format=options.image_format,
                               quality=options.quality)
    names = [f"{index:07d}" for index in range(n)]
    write_shard_set(Path(out), names, int, encode, options, source=f"synth_image(0..{n - 1})",
                    resolution=resolution, image_format=options.image_format)
    return Path(out)


def encode_synth(name: str, index: int, *, resolution: int, image_format: str, quality: int) -> Stored:
    return encode_array(Image.fromarray(synth_image(index, resolution)), image_format, quality)
