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
10–25) with room for photographic lighting. It also takes skin-coloured clothing, wood or sand, and misses
skin under coloured light: an image whose mask covers less than MIN_SKIN_FRACTION of its pixels gets no ITA
(NaN) and falls in the "no skin found" stratum. ITA measures the colour in the photo, not a person's skin
type, and lighting shifts it; the strata tell where a model's scores differ, not why.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SKIN_L = (15.0, 95.0)
SKIN_CHROMA = (8.0, 45.0)
SKIN_HUE_DEGREES = (25.0, 75.0)
MIN_SKIN_FRACTION = 0.05
SKIN_MASK = (f"{SKIN_L[0]:g} ≤ L ≤ {SKIN_L[1]:g}, {SKIN_CHROMA[0]:g} ≤ C*ab ≤ {SKIN_CHROMA[1]:g}, "
             f"{SKIN_HUE_DEGREES[0]:g}° ≤ h_ab ≤ {SKIN_HUE_DEGREES[1]:g}° (CIELAB, D65); at least "
             f"{MIN_SKIN_FRACTION:.0%} of the pixels")
ITA_STATISTIC = "atan((median L − 50) / median b) · 180/π over the skin pixels of the ground truth"

# (name, lower bound excluded, upper bound included), lightest first; NaN ITAs go to NO_SKIN.
CATEGORIES = (("very light", 55.0, math.inf), ("light", 41.0, 55.0), ("intermediate", 28.0, 41.0),
              ("tan", 10.0, 28.0), ("brown", -30.0, 10.0), ("dark", -math.inf, -30.0))
NO_SKIN = "no skin found"
STRATA = (*(name for name, _, _ in CATEGORIES), NO_SKIN)


def skin_mask(lab: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: the skin pixels of CIELAB images (N, 3, H, W)."""
    lightness, a, b = lab.unbind(1)
    chroma = torch.hypot(a, b)
    hue = torch.rad2deg(torch.atan2(b, a))
    return ((lightness >= SKIN_L[0]) & (lightness <= SKIN_L[1]) & (chroma >= SKIN_CHROMA[0])
            & (chroma <= SKIN_CHROMA[1]) & (hue >= SKIN_HUE_DEGREES[0]) & (hue <= SKIN_HUE_DEGREES[1]))


def individual_typology_angle(lab: torch.Tensor) -> torch.Tensor:
    """(N,) float64 ITA in degrees of each CIELAB image (N, 3, H, W) on its skin pixels; NaN with too few of them."""
    lab = lab.double()
    mask = skin_mask(lab).flatten(1)
    angles = torch.full((len(lab),), math.nan, dtype=torch.float64, device=lab.device)
    for i, (pixels, skin) in enumerate(zip(lab.flatten(2), mask, strict=True)):
        if skin.float().mean() >= MIN_SKIN_FRACTION:
            lightness, b = pixels[0, skin].quantile(0.5), pixels[2, skin].quantile(0.5)
            angles[i] = torch.rad2deg(torch.atan((lightness - 50.0) / b))  # b > 0 on skin pixels
    return angles


def stratum_of(ita: np.ndarray) -> np.ndarray:
    """Index into STRATA of each ITA (degrees): its category, or NO_SKIN for NaN."""
    ita = np.asarray(ita, dtype=np.float64)
    index = np.full(ita.shape, len(CATEGORIES), dtype=np.int64)
    for position, (_, lower, upper) in enumerate(CATEGORIES):
        index[(ita > lower) & (ita <= upper)] = position
    return index
