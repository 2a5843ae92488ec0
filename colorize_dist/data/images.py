"""Images to 8-bit RGB the same way everywhere: `shards make`, the reference loader, `shards verify`, `colorize`.

Pillow opens a 16-bit grayscale PNG or TIFF as mode "I;16" (some files as "I"), and `convert("RGB")` clips
those values at 255, so a 16-bit gray photo became pure white. `to_8bit` scales the full 16-bit range to
8 bits first (and float "F" images from [0, 1]). Pillow itself reduces 16-bit RGB and RGBA PNGs to 8 bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints, holding 16-bit samples here
# JPEG start-of-frame markers. GPUs' hardware JPEG decoders take baseline (SOF0) frames only; progressive ones
# (SOF2, SOF6, SOF10, SOF14) decode with CUDA instead, and DALI decodes PNG on the CPU even with `mixed`.
PROGRESSIVE_SOF = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
OTHER_SOF = frozenset((0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF))


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
