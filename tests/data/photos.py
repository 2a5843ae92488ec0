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


# Face-like images: crops of the colour portraits (astronaut, grace_hopper as `photo` gives them) and of the cat,
# from the head with hair and background down to skin only, as (left, top, right, bottom).
FACE_CROPS = {
    "astronaut head": ("astronaut", (140, 10, 320, 200)),
    "astronaut face": ("astronaut", (170, 60, 280, 180)),
    "astronaut skin": ("astronaut", (185, 90, 265, 170)),
    "hopper head": ("grace_hopper", (130, 80, 400, 350)),
    "hopper face": ("grace_hopper", (160, 150, 370, 340)),
    "hopper skin": ("grace_hopper", (190, 200, 340, 330)),
    "cat face": ("chelsea", (100, 0, 400, 300)),
}
# How the colour faces are muted: (a, b) chroma scaled by `saturation`, then shifted by (Δa, Δb) (a regrade).
MUTED = {"as shot": (1.0, 0.0, 0.0), "saturation 0.6": (0.6, 0.0, 0.0), "saturation 0.4": (0.4, 0.0, 0.0),
         "saturation 0.25": (0.25, 0.0, 0.0), "warm, saturation 0.5": (0.5, 4.0, 10.0),
         "cool, saturation 0.5": (0.5, -3.0, -10.0)}
FAINT_TINT = (1.0, 0.97, 0.92)  # a B&W print on slightly warm paper
STRIP = 0.08  # share of the width that a strip of another colour photo takes along one edge of a gray face


def face(name: str, side: int) -> Image.Image:
    """FACE_CROPS[name] resized to side² (Lanczos)."""
    source, box = FACE_CROPS[name]
    return photo(source).crop(box).resize((side, side), Image.Resampling.LANCZOS)


def muted(image: Image.Image, saturation: float, delta_a: float = 0.0, delta_b: float = 0.0) -> Image.Image:
    """`image` with its CIELAB chroma scaled by `saturation` and shifted by (delta_a, delta_b), back in 8-bit sRGB."""
    color = pytest.importorskip("skimage.color")
    lab = color.rgb2lab(np.asarray(image.convert("RGB")) / 255.0)
    lab[..., 1:] = lab[..., 1:] * saturation + np.array([delta_a, delta_b])
    return Image.fromarray(np.rint(color.lab2rgb(lab) * 255.0).clip(0, 255).astype(np.uint8))


def gray_with_strip(image: Image.Image, strip_from: Image.Image) -> Image.Image:
    """`image` in gray with a STRIP-wide strip of the colour photo `strip_from` along its left edge."""
    gray = np.asarray(image.convert("L").convert("RGB")).copy()
    width = round(STRIP * gray.shape[1])
    colour = np.asarray(strip_from.convert("RGB").resize((gray.shape[1], gray.shape[0])))
    gray[:, :width] = colour[:, :width]
    return Image.fromarray(gray)
