"""Real photos (those scikit-image and matplotlib ship) and the gray and toned prints made from them, for the
tests of what `shards make` counts as grayscale."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

# Colour photos: a portrait and an astronaut, a cat, a cup, a rocket launch, a retina (nearly one hue), a
# stained tissue, a motorcycle, and the Hubble deep field (mostly black).
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "stereo_motorcycle",
                 "hubble_deep_field", "grace_hopper")
# A toned print's colour as a function of its gray value: black → the tint at white.
TINTS = {"sepia": (1.0, 0.88, 0.70), "cyanotype": (0.55, 0.75, 1.0), "yellowed paper": (0.96, 0.92, 0.78)}
SIDE = 512  # photos are reduced to at most this (the measurement itself looks at 128 px)


def photo(name: str) -> Image.Image:
    """One of COLOUR_PHOTOS as RGB, at most SIDE pixels a side."""
    if name == "grace_hopper":
        from matplotlib import cbook

        image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    else:
        data = pytest.importorskip("skimage.data")
        pixels = data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(data, name)()
        image = Image.fromarray(pixels).convert("RGB")
    image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    return image


def toned(image: Image.Image, tint: tuple[float, float, float]) -> Image.Image:
    """A monochrome print of `image` in one tint (its gray value times the tint)."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    return Image.fromarray(np.rint(gray * np.array(tint)).clip(0, 255).astype(np.uint8))


def as_jpeg(image: Image.Image, quality: int) -> Image.Image:
    """`image` after a round trip through JPEG (4:2:0 chroma, as scans are usually shared)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def colour_in_centre(image: Image.Image, area: float) -> Image.Image:
    """`image` in gray except a centred square of `area` (a fraction) of it, which keeps its colour."""
    colour, gray = np.asarray(image), np.asarray(image.convert("L").convert("RGB")).copy()
    height, width = gray.shape[:2]
    side = int(np.sqrt(area * height * width))
    top, left = (height - side) // 2, (width - side) // 2
    gray[top:top + side, left:left + side] = colour[top:top + side, left:left + side]
    return Image.fromarray(gray)
