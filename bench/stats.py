"""Percentiles and "added over direct" arithmetic, kept in one place so the report and its tests agree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and tail of a set of samples, in the unit they were given in."""

    count: int
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(len(values), percentile(values, 50), percentile(values, 99))


def added(target: Spread | None, direct: Spread | None) -> tuple[float, float] | None:
    """What a hop adds: the difference of p50s and of p99s against the engine reached directly."""
    if target is None or direct is None:
        return None
    return target.p50 - direct.p50, target.p99 - direct.p99


def within(value: float, reference: float, *, factor: float, slack: float) -> bool:
    """``value <= factor * reference``, or within ``slack`` of it where the reference is about zero, or no more
    than zero.

    A ratio of two numbers near zero is noise, so an absolute allowance decides there. An added time of zero or
    less means nothing added over engine-direct, which meets a goal on added time whatever the reference did
    (with tokens back to back both proxies show negative added delay: the direct baseline includes waiting in the
    engine's socket buffer, which a proxy's reading shortens).
    """
    return value <= max(factor * reference, reference + slack, 0.0)
