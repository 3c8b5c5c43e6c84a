"""Correlations, ranks, resampling and line fits: small pure numpy functions.

Correlations take `y` with replicates on the first axis ([..., n] → [...]) so that one call
gives the point estimate and every bootstrap replicate; undefined values (n < 3, a constant
series) are NaN, never an exception.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

MIN_POINTS = 3  # a correlation of fewer points says nothing


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r between x [n] and each row of y [..., n]; NaN when undefined."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[-1] < MIN_POINTS:
        return np.full(y.shape[:-1], np.nan)
    dx = x - x.mean()
    dy = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dy * dx).sum(axis=-1) / denom
    # A constant series has no correlation; rounding can leave |r| a hair above 1.
    return np.where(denom > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ: Pearson's r of the ranks (ties share their average rank)."""
    return pearson(rankdata(x), rankdata(y, axis=-1))


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of the finite samples; NaNs when there are none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def resample_counts(strata: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """How often each item is drawn [replicates, items], resampling with replacement within each stratum."""
    counts = np.zeros((replicates, strata.size), dtype=np.float32)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        counts[:, members] = rng.multinomial(members.size, np.full(members.size, 1 / members.size), size=replicates)
    return counts


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of y on x."""
    slope, intercept = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 1)
    return float(slope), float(intercept)
