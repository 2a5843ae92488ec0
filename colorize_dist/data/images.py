"""Images to 8-bit RGB the same way everywhere: `shards make`, the reference loader, `shards verify`, `colorize`;
and what `shards make` measures about an image (transparency, colour that its lightness does not explain).

Pillow opens a 16-bit grayscale PNG or TIFF as mode "I;16" (some files as "I"), and `convert("RGB")` clips
those values at 255, so a 16-bit gray photo became pure white. `to_8bit` scales the full 16-bit range to
8 bits first (and float "F" images from [0, 1]). Pillow itself reduces 16-bit RGB and RGBA PNGs to 8 bits.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from colorize_dist.color import rgb_to_lab

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints, holding 16-bit samples here
# JPEG start-of-frame markers. GPUs' hardware JPEG decoders take baseline (SOF0) frames only; progressive ones
# (SOF2, SOF6, SOF10, SOF14) decode with CUDA instead, and DALI decodes PNG on the CPU even with `mixed`.
PROGRESSIVE_SOF = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
OTHER_SOF = frozenset((0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF))
BACKGROUND = (255, 255, 255)  # what transparent pixels become: white, as a page or a browser shows them
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
CHROMA_SIDE = 64  # `residual_chroma` looks at the image box-filtered to at most this many pixels a side
CHROMA_PERCENTILE = 99.0
# `residual_chroma` leaves out this share of the width and of the height along each edge: a scanner bed, a coloured
# mat or a strip of another photo along the edge of a gray print is not the image's colour.
CHROMA_EDGE = 0.1


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` with 8-bit channels: 16-bit gray becomes "L" (65535 → 255), float "F" in [0, 1] becomes "L"."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(values * (255 / 65535)).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return Image.fromarray(np.nan_to_num(np.rint(values * scale)).clip(0, 255).astype(np.uint8), "L")
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode and bit depth (alpha dropped)."""
    image = to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def is_progressive_jpeg(data: bytes) -> bool:
    """Whether `data` is a JPEG whose frame is progressive; False for baseline JPEGs and other formats."""
    if data[:2] != b"\xff\xd8":
        return False
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False  # not at a marker: malformed, let the decoder say so
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in PROGRESSIVE_SOF:
            return True
        elif marker in OTHER_SOF or marker in (0xD9, 0xDA):  # another frame type, end of image, start of scan
            return False
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return False


def has_transparency(image: Image.Image) -> bool:
    """Whether some pixel is not fully opaque (an alpha channel, or a palette or colour key with tRNS)."""
    if image.mode not in TRANSPARENT_MODES and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getextrema()[3][0] < 255


def on_background(image: Image.Image) -> Image.Image:
    """`image` as RGB composited onto BACKGROUND: what was transparent shows the background, never the colour
    stored under it (a palette PNG's transparent entry is often pure green or black)."""
    background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def residual_chroma(image: Image.Image) -> float:
    """How much colour `image` has beyond one tint that follows its lightness, in CIELAB units.

    The tint is a hue direction (the line through a = b = 0 that fits the pixels' (a, b) best) with a chroma
    along it that depends on lightness only (the median over the pixels of each L, in bins of 1). The residual
    is each pixel's distance in the (a, b) plane from the tint at its lightness, at the 99th percentile over
    pixels, on the image without a CHROMA_EDGE margin along each edge, box-filtered to at most CHROMA_SIDE pixels
    a side. A gray image scores 0, and so does a toned one (sepia, cyanotype, a print on yellowed paper); a colour
    photo scores high as soon as 1 % of its pixels have another colour, so a colour subject on a gray background
    counts as colour, and so do flat graphics of several hues. A tight crop of a face whose only colour is muted
    skin is nearly one tint too, and scores low: see `data.make` for the band that is kept for review.
    """
    small = image.convert("RGB")
    margin_x, margin_y = round(CHROMA_EDGE * small.width), round(CHROMA_EDGE * small.height)
    small = small.crop((margin_x, margin_y, small.width - margin_x, small.height - margin_y))
    small.thumbnail((CHROMA_SIDE, CHROMA_SIDE), Image.Resampling.BOX)
    lab = rgb_to_lab(torch.from_numpy(np.array(small))[None], num_threads=1)[0].numpy().astype(np.float64)
    lightness, ab = lab[0].ravel(), lab[1:].reshape(2, -1)
    hue = np.linalg.eigh(ab @ ab.T)[1][:, -1]  # unit vector of the best line through the origin
    along = hue @ ab
    bins, members = np.unique(np.floor(lightness).astype(np.int64), return_inverse=True)
    chroma = np.array([np.median(along[members == index]) for index in range(len(bins))])
    tint = hue[:, None] * chroma[members]
    return float(np.percentile(np.hypot(*(ab - tint)), CHROMA_PERCENTILE))


def ab_sums(image: Image.Image) -> tuple[float, float, int]:
    """The sums of CIELAB a and b over an RGB image's pixels, and its pixel count (for a set's mean ab).

    Summed by NumPy: torch's own reductions go multi-threaded on large images, and in `shards make`'s forked
    workers an OpenMP pool inherited from the parent can hang them."""
    lab = rgb_to_lab(torch.from_numpy(np.array(image.convert("RGB")))[None], num_threads=1)[0].numpy()
    return float(lab[1].sum(dtype=np.float64)), float(lab[2].sum(dtype=np.float64)), image.width * image.height
