"""Small order statistics; the samples are tens to thousands of values, so plain sorting is enough."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; ``q`` in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def gaps(times: Sequence[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def is_regular(intervals: Sequence[float], tolerance: float = 0.25) -> bool:
    """True when the intervals scatter little around their median (median absolute deviation)."""
    middle = median(intervals)
    if middle is None or middle <= 0 or len(intervals) < 2:
        return False
    spread = median([abs(value - middle) for value in intervals])
    return spread is not None and spread <= tolerance * middle
