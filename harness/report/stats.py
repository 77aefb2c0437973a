"""Statistics for the report as pure functions: medians and IQRs, bootstrap CIs, McNemar's test, binomial SE.

Medians and quartiles are ``np.percentile``'s (linear interpolation); :func:`median` is also the aggregation the
report applies to pandas groups. Every random procedure takes a ``seed`` (default :data:`DEFAULT_SEED`) and builds
its own :class:`numpy.random.Generator`, so the same inputs always give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 10_000
EXACT_BELOW = 25  # McNemar: exact binomial test when discordant pairs < this, else chi-square


class MedianIQR(NamedTuple):
    median: float
    q25: float
    q75: float


class Estimate(NamedTuple):
    """A point estimate with a confidence interval ``[lo, hi]``."""

    value: float
    lo: float
    hi: float


class McNemar(NamedTuple):
    """McNemar's test on paired correctness: ``a_only`` = A right and B wrong, ``b_only`` the reverse."""

    a_only: int
    b_only: int
    statistic: float | None  # chi-square statistic (None for the exact test)
    p_value: float
    method: str  # "exact binomial" or "chi-square (continuity-corrected)"


def _values(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError("no values")
    return arr


def median_iqr(values: Sequence[float]) -> MedianIQR:
    """Median and 25th/75th percentiles (numpy's default linear interpolation); ``None``/NaN are dropped."""
    arr = _values(values)
    q25, med, q75 = np.percentile(arr, [25, 50, 75])
    return MedianIQR(float(med), float(q25), float(q75))


def median(values: Sequence[float]) -> float:
    """The median of :func:`median_iqr`, NaN when there is no value: an aggregation for pandas
    (``df.groupby(...).agg(median)``). pandas' own ``GroupBy.median``/``quantile`` interpolate in their own code,
    which can differ from numpy's in the last bit; ``np.percentile`` keeps every report number as it was."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(np.percentile(arr, 50)) if arr.size else math.nan


def bootstrap_mean_ci(values: Sequence[float], n_resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                      seed: int = DEFAULT_SEED) -> Estimate:
    """Mean with a percentile-bootstrap CI (resampling ``values`` with replacement, ``n_resamples`` times)."""
    arr = _values(values)
    mean = float(arr.mean())
    if arr.size == 1:
        return Estimate(mean, mean, mean)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // arr.size)  # bound memory: resample in chunks of indices
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(mean, float(min(lo, mean)), float(max(hi, mean)))


def _paired(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired vectors must have the same length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("no pairs")
    return x, y


def paired_bootstrap_diff(a: Sequence[bool], b: Sequence[bool], n_resamples: int = DEFAULT_RESAMPLES,
                          confidence: float = 0.95, seed: int = DEFAULT_SEED) -> Estimate:
    """Accuracy difference ``mean(a) - mean(b)`` on paired correctness vectors, with a paired-bootstrap CI.

    Resampling examples (pairs) with replacement only changes how many pairs of each kind (A only right,
    B only right, other) are drawn, so the resample counts are drawn from the multinomial directly; this is the
    same distribution as resampling indices, at a cost independent of the number of examples.
    """
    x, y = _paired(a, b)
    n = x.size
    diff = float(x.mean() - y.mean())
    probs = np.array([np.sum(x & ~y), np.sum(~x & y), np.sum(x == y)], dtype=float) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, probs, size=n_resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(diffs, [100 * alpha, 100 * (1 - alpha)])
    return Estimate(diff, float(min(lo, diff)), float(max(hi, diff)))


def mcnemar_from_counts(a_only: int, b_only: int, exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test from the discordant counts: exact two-sided binomial test when ``a_only + b_only`` is below
    ``exact_below``, else the chi-square test with continuity correction, ``(|b - c| - 1)^2 / (b + c)``, 1 dof."""
    from scipy import stats as sps  # imported here: scipy.stats is slow to import and only needed here

    n = a_only + b_only
    if n == 0:
        return McNemar(a_only, b_only, None, 1.0, "exact binomial")
    if n < exact_below:
        p = sps.binomtest(a_only, n, 0.5, alternative="two-sided").pvalue
        return McNemar(a_only, b_only, None, float(min(1.0, p)), "exact binomial")
    stat = (abs(a_only - b_only) - 1) ** 2 / n
    return McNemar(a_only, b_only, float(stat), float(sps.chi2.sf(stat, 1)), "chi-square (continuity-corrected)")


def mcnemar(a: Sequence[bool], b: Sequence[bool], exact_below: int = EXACT_BELOW) -> McNemar:
    """McNemar's test on paired correctness vectors (see :func:`mcnemar_from_counts`)."""
    x, y = _paired(a, b)
    return mcnemar_from_counts(int(np.sum(x & ~y)), int(np.sum(~x & y)), exact_below)


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples: ``sqrt(p (1 - p) / n)``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return math.sqrt(max(p * (1 - p), 0.0) / n)
