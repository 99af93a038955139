"""trtexec's statistics, reproduced exactly (shared/tensorrt-notes.md §7, sampleReporting.cpp).

* median: the middle element of the sorted list (mean of the two middles when the count is even);
* percentile p: element ``max(n - 1 - int((1 - p/100) * n), 0)`` of the ascending list (float32);
* coefficient of variation: population standard deviation / mean x 100 (percent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)


def percentile_index(p: float, n: int) -> int:
    """Index of trtexec's percentile ``p`` in an ascending list of ``n`` values.

    trtexec evaluates ``(1 - p / 100.F) * n`` in single precision and truncates; in double precision
    (1 - 0.9) * 10 is 0.999..., which would pick the maximum instead of the 9th of 10 values. So the
    arithmetic is done in float32 here, as trtexec does.
    """
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if n <= 0:
        raise ValueError("percentile of an empty list")
    exclude = int((np.float32(1) - np.float32(p) / np.float32(100)) * np.float32(n))
    return max(n - 1 - exclude, 0)


def median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        raise ValueError("median of an empty list")
    mid = n // 2
    return float(sorted_values[mid]) if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population std / mean x 100; 0 for a constant series, inf when the mean is 0 but not all values are."""
    n = len(values)
    if n == 0:
        raise ValueError("coefficient of variation of an empty list")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    if mean == 0.0:
        return 0.0 if var == 0.0 else math.inf
    return math.sqrt(var) / mean * 100.0


@dataclass(frozen=True)
class Summary:
    """min / max / mean / median / percentiles / CoV of one metric (trtexec's fields)."""

    minimum: float
    maximum: float
    mean: float
    median: float
    percentiles: tuple[tuple[float, float], ...]  # ((p, value), ...)
    cov_percent: float
    count: int

    def percentile(self, p: float) -> float:
        for q, value in self.percentiles:
            if q == p:
                return value
        raise KeyError(f"percentile {p} was not computed; have {[q for q, _ in self.percentiles]}")


def summarize(values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Summary:
    if not values:
        raise ValueError("cannot summarize an empty series")
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    return Summary(
        minimum=ordered[0],
        maximum=ordered[-1],
        mean=sum(ordered) / n,
        median=median(ordered),
        percentiles=tuple((float(p), ordered[percentile_index(p, n)]) for p in percentiles),
        cov_percent=coefficient_of_variation(ordered),
        count=n,
    )
