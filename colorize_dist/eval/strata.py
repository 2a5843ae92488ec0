"""Skin-tone strata: the Individual Typology Angle (ITA) of each ground-truth face, measured on its skin pixels.

ITA = atan((L − 50) / b) · 180/π (Chardon, Cretois & Hourseau 1991), in degrees, from CIELAB (D65). Each image
gets one ITA: that of the medians of L and of b over its skin pixels (medians, so that hair, lips or background
that pass the mask move it little). The six standard categories (Del Bino & Bernerd 2013):

    very light  ITA > 55°         tan     10° < ITA ≤ 28°
    light       41° < ITA ≤ 55°   brown  −30° < ITA ≤ 10°
    intermediate 28° < ITA ≤ 41°  dark    ITA ≤ −30°

Skin pixels are a fixed box in CIELAB, with no network and no model: 15 ≤ L ≤ 95 (not black or blown out),
8 ≤ C*ab ≤ 45 (neither gray nor saturated) and 25° ≤ h_ab ≤ 75° (the red-to-yellow hues of skin, so b > 0).
The box holds the in-vivo skin colours measured across ethnic groups (L about 30–75, a about 5–20, b about
10–25) with room for photographic lighting. It also takes auburn hair, skin-coloured clothing, a brown door,
wood or sand, and misses skin under coloured light. So the mask is looked for only where the face is: in an
aligned face set (CelebA-HQ, FFHQ and the like: the face centred, eyes a little above the middle) the region
"face" (names.FACE_REGION: the cheeks, nose and mouth), on uncropped photos the whole frame ("frame"). Each image's
estimate records how many pixels it rests on; one resting on fewer than MIN_SKIN_PIXELS pixels or
MIN_SKIN_FRACTION of the region gets no ITA (NaN) and falls in the "undetermined" stratum rather than a wrong
one. ITA measures the colour in the photo, not a person's skin type: the lightness of the detected skin
follows the lighting too (a brightly lit face reads "very light", a dim scene "dark"); the strata tell where a
model's scores differ, not why. Users who have group labels bring them instead (`eval --groups`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from colorize_dist.eval.names import REGIONS

SKIN_L = (15.0, 95.0)
SKIN_CHROMA = (8.0, 45.0)
SKIN_HUE_DEGREES = (25.0, 75.0)
MIN_SKIN_FRACTION = 0.25  # of the region's pixels
MIN_SKIN_PIXELS = 50
SKIN_MASK = (f"{SKIN_L[0]:g} ≤ L ≤ {SKIN_L[1]:g}, {SKIN_CHROMA[0]:g} ≤ C*ab ≤ {SKIN_CHROMA[1]:g}, "
             f"{SKIN_HUE_DEGREES[0]:g}° ≤ h_ab ≤ {SKIN_HUE_DEGREES[1]:g}° (CIELAB, D65); at least "
             f"{MIN_SKIN_FRACTION:.0%} of the region's pixels and {MIN_SKIN_PIXELS} pixels, else undetermined")
ITA_STATISTIC = "atan((median L − 50) / median b) · 180/π over the skin pixels of the ground truth"
WHAT_STRATA_ARE = ("the lightness and hue of the skin detected in the ground truth (ITA), which follow the "
                   "lighting as well as the person: they show where the scores differ, not why")

# (name, lower bound excluded, upper bound included), lightest first; NaN ITAs go to UNDETERMINED.
CATEGORIES = (("very light", 55.0, math.inf), ("light", 41.0, 55.0), ("intermediate", 28.0, 41.0),
              ("tan", 10.0, 28.0), ("brown", -30.0, 10.0), ("dark", -math.inf, -30.0))
UNDETERMINED = "undetermined"
STRATA = (*(name for name, _, _ in CATEGORIES), UNDETERMINED)


def skin_mask(lab: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: the skin pixels of CIELAB images (N, 3, H, W)."""
    lightness, a, b = lab.unbind(1)
    chroma = torch.hypot(a, b)
    hue = torch.rad2deg(torch.atan2(b, a))
    return ((lightness >= SKIN_L[0]) & (lightness <= SKIN_L[1]) & (chroma >= SKIN_CHROMA[0])
            & (chroma <= SKIN_CHROMA[1]) & (hue >= SKIN_HUE_DEGREES[0]) & (hue <= SKIN_HUE_DEGREES[1]))


def region_of(lab: torch.Tensor, region: str) -> torch.Tensor:
    """The pixels of CIELAB images (N, 3, H, W) inside REGIONS[region] (at least one pixel a side)."""
    height, width = lab.shape[-2:]
    left, top, right, bottom = REGIONS[region]
    rows = slice(int(top * height), max(int(top * height) + 1, round(bottom * height)))
    columns = slice(int(left * width), max(int(left * width) + 1, round(right * width)))
    return lab[..., rows, columns]


def skin_estimate(lab: torch.Tensor, region: str = "face") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each CIELAB image's (N, 3, H, W) skin estimate in `region`: (ITA in degrees, NaN where undetermined; the
    number of skin pixels it rests on; their share of the region's pixels), each (N,) float64."""
    lab = region_of(lab.double(), region)
    mask = skin_mask(lab).flatten(1)
    pixels = mask.sum(dim=1).double()
    fraction = pixels / mask.shape[1]
    angles = torch.full((len(lab),), math.nan, dtype=torch.float64, device=lab.device)
    for i, (values, skin) in enumerate(zip(lab.flatten(2), mask, strict=True)):
        if fraction[i] >= MIN_SKIN_FRACTION and pixels[i] >= MIN_SKIN_PIXELS:
            lightness, b = values[0, skin].quantile(0.5), values[2, skin].quantile(0.5)
            angles[i] = torch.rad2deg(torch.atan((lightness - 50.0) / b))  # b > 0 on skin pixels
    return angles, pixels, fraction


def stratum_of(ita: np.ndarray) -> np.ndarray:
    """Index into STRATA of each ITA (degrees): its category, or UNDETERMINED for NaN."""
    ita = np.asarray(ita, dtype=np.float64)
    index = np.full(ita.shape, len(CATEGORIES), dtype=np.int64)
    for position, (_, lower, upper) in enumerate(CATEGORIES):
        index[(ita > lower) & (ita <= upper)] = position
    return index
