"""The crop and flip of each sample, fixed by (epoch seed, slot in the epoch's order), for both loaders.

Training: a flip with probability 1/2, then a box covering a random share `crop_scale` of the image with
an aspect ratio in ASPECT_RATIO_RANGE, resized to resolution². Validation: the largest centred square,
resized. The random numbers of a slot come from one generator per block of DRAW_BLOCK slots, seeded by
(epoch seed, block), so they depend neither on the rank that reads the slot nor on the batch it falls in:
any number of ranks, micro-batch size or resumed position cuts the same boxes. Both loaders turn them into a
flip and a box (from the image's size) the same way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from colorize_dist.data.config import ASPECT_RATIO_RANGE

EVALUATION_CROP = "the largest centred square of each image, no random crop, no flip"  # what `eval` scores
CROP_ATTEMPTS = 10  # then the whole image, as DALI's and torchvision's random crops do

Box = tuple[int, int, int, int]  # left, top, right, bottom (pixels; right and bottom excluded)


DRAWS = 1 + 4 * CROP_ATTEMPTS  # per sample: the flip, then (area, aspect ratio, x, y) for each crop attempt
DRAW_BLOCK = 256  # slots per random generator
LOG_RATIOS = (math.log(ASPECT_RATIO_RANGE[0]), math.log(ASPECT_RATIO_RANGE[1]))


@dataclass(frozen=True)
class Augment:
    resolution: int
    seed: int | None  # the rank's epoch seed; None: validation (centre crop, no flip)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True

    def draws(self, slots: np.ndarray) -> np.ndarray | None:
        """The uniform numbers of some epoch slots, (len(slots), DRAWS): those of slot s are row s % DRAW_BLOCK of
        the block s // DRAW_BLOCK, so any slot is known without drawing for the others."""
        if self.seed is None:
            return None
        blocks = slots // DRAW_BLOCK
        rows = np.empty((len(slots), DRAWS))
        for block in np.unique(blocks):
            chosen = blocks == block
            rows[chosen] = _draw_block(self.seed, int(block))[slots[chosen] % DRAW_BLOCK]
        return rows

    def mirrored(self, draws: np.ndarray | None) -> bool:
        """Whether the sample with these draws (a row of `draws`) is flipped horizontally."""
        return draws is not None and self.flip and bool(draws[0] < 0.5)

    def box(self, size: tuple[int, int], draws: np.ndarray | None) -> Box:
        """The crop of an image of `size` (width, height) in the orientation it was decoded in."""
        return center_box(size) if draws is None else random_crop_box(size, self.crop_scale, draws[1:])


@functools.lru_cache(maxsize=4)  # consecutive micro-batches share blocks
def _draw_block(seed: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, block]).random((DRAW_BLOCK, DRAWS))


def random_crop_box(size: tuple[int, int], scale: tuple[float, float], uniforms: np.ndarray) -> Box:
    """A box covering a random share `scale` of the image with an aspect ratio in ASPECT_RATIO_RANGE, from
    4 × CROP_ATTEMPTS uniform numbers in [0, 1) (the first attempt that fits)."""
    width, height = size
    for area_u, ratio_u, x_u, y_u in np.asarray(uniforms).reshape(CROP_ATTEMPTS, 4).tolist():
        area = width * height * (scale[0] + (scale[1] - scale[0]) * area_u)
        ratio = math.exp(LOG_RATIOS[0] + (LOG_RATIOS[1] - LOG_RATIOS[0]) * ratio_u)
        crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = min(int(x_u * (width - crop_width + 1)), width - crop_width)
            top = min(int(y_u * (height - crop_height + 1)), height - crop_height)
            return left, top, left + crop_width, top + crop_height
    return 0, 0, width, height


def center_box(size: tuple[int, int]) -> Box:
    """The largest centred square."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_crop(crop: torch.Tensor, resolution: int) -> torch.Tensor:
    """A uint8 (h, w, 3) crop on the CPU → (resolution, resolution, 3): bilinear with antialiasing, as PIL's BILINEAR
    (torch's uint8 path)."""
    if crop.shape[:2] == (resolution, resolution):
        return crop
    # torch's fast uint8 path wants channels-last strides, the batch dimension's included: (1, h, w, 3) permuted has
    # them without a copy; a crop DALI hands over is already contiguous, and (3, h, w)[None] would give dimension 0 a
    # stride of 3, which sends interpolate down its generic path at twice the time (measured)
    nchw = crop[None].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(nchw, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0)
