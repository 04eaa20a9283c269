"""How sure a latency is: confidence intervals of a median and of a ratio of medians.

A trial's latency is the median of `hw.repeat` timed repeats. Two configurations are only
ordered when their intervals say so, so every median comes with a 95% interval:

- `median_ci`: distribution-free, from order statistics. The number B of repeats below the
  true median is Binomial(n, 1/2), so the sorted samples x(j) and x(n+1-j) bracket it with
  probability 1 - 2 P(B < j); j is the largest index keeping that >= the level (x(6), x(15)
  of 20 repeats). With fewer than 6 repeats no pair reaches 95%: the interval is the whole
  range, and `coverage` says how sure it is.
- `ratio_ci`: the speedup over PyTorch is a ratio of two medians; its interval comes from a
  seeded bootstrap of both sample sets (percentile method).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["LEVEL", "median_ci", "coverage", "ratio_ci"]

LEVEL = 0.95


def _rank(n: int, level: float) -> int:
    """The largest 1-based j with 1 - 2 P(B < j) >= level, B ~ Binomial(n, 1/2); 1 if none."""
    below, j = 0.0, 1
    for i in range(n):
        below += math.comb(n, i) / 2 ** n  # P(B <= i)
        if 1 - 2 * below < level:
            break
        j = i + 1
    return min(j, (n + 1) // 2)


def coverage(n: int, level: float = LEVEL) -> float:
    """The probability that `median_ci` of n samples covers the true median."""
    j = _rank(n, level)
    return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n


def median_ci(samples: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """A `level` confidence interval of the median of `samples` (order statistics)."""
    values = sorted(samples)
    if not values:
        raise ValueError("median_ci: no samples")
    j = _rank(len(values), level)
    return float(values[j - 1]), float(values[len(values) - j])


def ratio_ci(numerator: Sequence[float], denominator: Sequence[float], level: float = LEVEL,
             resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A `level` interval of median(numerator) / median(denominator), by a seeded bootstrap
    that resamples both sets independently."""
    a, b = np.asarray(numerator, float), np.asarray(denominator, float)
    if not len(a) or not len(b):
        raise ValueError("ratio_ci: no samples")
    rng = np.random.default_rng(seed)
    ratios = (np.median(rng.choice(a, (resamples, len(a))), axis=1)
              / np.median(rng.choice(b, (resamples, len(b))), axis=1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)

