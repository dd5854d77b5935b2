"""Intervals and tests for group-robustness numbers, as pure functions (accuracies as fractions).

* :func:`binomial_half_width` — the noise floor of one test group: the 95 % normal-approximation
  half-width of an accuracy measured on ``n`` images.
* :func:`bootstrap_worst_group_interval` — a group-stratified bootstrap interval of one run's
  worst-group accuracy: each group's images are resampled with replacement within the group
  (its size fixed), which for 0/1 correctness is drawing the group's correct count from
  Binomial(n_g, acc_g); the worst group is recomputed on every replicate.
* :func:`paired_difference` — the per-seed differences of a method and a reference: mean, 95 %
  t-interval (ddof 1) and the two-sided paired-t p-value.
* :func:`holm_adjust` — Holm's step-down adjustment of a family of p-values, and
  :func:`holm_levels`, the confidence level of each comparison's Holm-adjusted interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def binomial_half_width(n: int, p: float = 0.8, z: float = Z95) -> float:
    """Half-width of the normal-approximation interval of an accuracy ``p`` on ``n`` images
    (``z`` = 1.96: 95 %); NaN for ``n`` < 1. At ``p`` = 0.8, 642 images give ±0.031."""
    if n < 1:
        return math.nan
    return z * math.sqrt(p * (1.0 - p) / n)


def bootstrap_worst_group_interval(counts: Sequence[int], accuracies: Sequence[float], *,
                                   n_boot: int = 2000, level: float = 0.95, seed: int = 0
                                   ) -> tuple[float, float]:
    """Percentile interval of the worst-group accuracy under a group-stratified bootstrap.

    ``counts[i]`` images of group ``i`` were evaluated with accuracy ``accuracies[i]``; groups
    with no images are left out. Deterministic for a given ``seed``. Returns ``(low, high)``;
    (NaN, NaN) when no group has images.
    """
    n = np.asarray(counts, dtype=np.int64)
    acc = np.asarray(accuracies, dtype=np.float64)
    if n.shape != acc.shape:
        raise ValueError(f"counts and accuracies differ in length: {n.shape} vs {acc.shape}")
    keep = n > 0
    n, acc = n[keep], acc[keep]
    if n.size == 0:
        return math.nan, math.nan
    correct = np.rint(acc * n).astype(np.int64)
    # RandomState: NumPy keeps its stream fixed across versions, so published intervals (and
    # the committed results page) do not move with a NumPy upgrade
    rng = np.random.RandomState(seed)
    draws = rng.binomial(n[None, :], (correct / n)[None, :], size=(n_boot, n.size)) / n[None, :]
    worst = draws.min(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(worst, [tail, 1.0 - tail])
    return float(low), float(high)


# Below this spread (fractions) paired differences count as equal: accuracies are ratios of
# image counts, so real spreads are at least 1/N of a split, far above float rounding.
ZERO_SPREAD = 1e-9


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``method − reference`` with its t-interval and p-value."""

    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    std: float

    def interval(self, level: float) -> tuple[float, float]:
        """The t-interval of the mean difference at confidence ``level`` (e.g. a Holm level)."""
        if self.n_pairs < 2:
            return math.nan, math.nan
        if self.std == 0.0:
            return self.mean_diff, self.mean_diff
        half = scipy_stats.t.ppf(0.5 + level / 2.0, self.n_pairs - 1) * self.std \
            / math.sqrt(self.n_pairs)
        return self.mean_diff - half, self.mean_diff + half


def paired_difference(method: Sequence[float], reference: Sequence[float]) -> PairedDifference:
    """Paired comparison of two equally long sequences (one value per seed, same order).

    The interval is the 95 % t-interval of the mean difference (ddof 1); the p-value the
    two-sided paired-t test of a zero mean. With fewer than two pairs both are NaN. With
    identical differences (zero spread, which discrete accuracies make a real case) the t-test
    is undefined: the interval is the point, and p is the exact two-sided sign test's,
    ``min(1, 2 · 0.5^n)`` for a nonzero difference (1 for zero), so that n equal differences
    are evidence only as far as n coin flips are: three are not (p = 0.25), six would be.
    """
    a = np.asarray(method, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} vs {b.size}")
    d = a - b
    n = int(d.size)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(d.std(ddof=1))
    if std <= ZERO_SPREAD:  # equal up to float rounding (0.7 − 0.6 ≠ 0.6 − 0.5 in floats)
        p = 1.0 if abs(mean) <= ZERO_SPREAD else min(1.0, 2.0 * 0.5 ** n)
        return PairedDifference(n, mean, mean, mean, p, 0.0)
    se = std / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * se
    p = float(2.0 * scipy_stats.t.sf(abs(mean / se), n - 1))
    return PairedDifference(n, mean, mean - half, mean + half, p, std)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order.

    NaN p-values stay NaN and do not count in the family size.
    """
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return [float(x) for x in out]


def holm_levels(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """The confidence level of each comparison's Holm-adjusted interval, in the input order.

    The comparison with the ``k``-th smallest p-value (``k`` from 1) of ``m`` is tested at
    ``alpha / (m − k + 1)`` while every earlier step rejected; once a step fails, Holm stops and
    every later comparison keeps that step's level. So an interval at its level excludes zero
    exactly when its Holm-adjusted p-value is below ``alpha`` (a later, larger p-value fails at
    the stopping level too). NaN p-values get NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = finite.size
    stopped: float | None = None
    for rank, idx in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        level = 1.0 - alpha / (m - rank)
        if stopped is None and p[idx] >= alpha / (m - rank):
            stopped = level
        out[idx] = stopped if stopped is not None else level
    return [float(x) for x in out]
