"""95 % confidence intervals of per-image means: the percentile bootstrap over images, seeded.

A resample draws n of the n images with replacement (NumPy's PCG64 seeded by SeedSequence(seed, spawn_key)),
and its mean of every metric is the count-weighted mean of the per-image values; the interval is the 2.5 and
97.5 percentiles of RESAMPLES resample means. The values arrive in the split's order whatever the number of
processes, so the intervals do not depend on it. Strata are resampled separately (a stratified bootstrap), each
from its own stream, so that the interval of a difference between two strata is that of two independent means.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
METHOD = (f"percentile bootstrap over images ({RESAMPLES} resamples, NumPy PCG64 from SeedSequence({SEED}, "
          "spawn_key=(stream,)); stream 0 for all images, 1 + i for stratum i)")


def bootstrap_means(values: np.ndarray, stream: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, M) means of `values` (n, M) over resamples of its n rows, from random stream `stream`."""
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    if count == 0:
        raise ValueError("cannot bootstrap the mean of no images")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    means = np.empty((resamples, values.shape[1]))
    for resample in range(resamples):
        weights = np.bincount(rng.integers(0, count, size=count), minlength=count)
        means[resample] = weights @ values / count
    return means


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) per column of bootstrap `samples` (B, M): their (1 ∓ confidence)/2 quantiles."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail], axis=0)
    return low, high
