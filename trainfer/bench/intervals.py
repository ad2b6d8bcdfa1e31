"""How benchmarks state the spread of a ratio measured over interleaved rounds: the median with a 95 %
percentile-bootstrap interval (see :func:`median_interval`)."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

from trainfer.errors import InputError

__all__ = ["median_interval"]


def median_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """``(low, high)``: the 2.5th and 97.5th percentiles of the medians of ``resamples`` resamples of
    ``values`` drawn with replacement. Seeded, so the same values give the same interval."""
    if not values:
        raise InputError("median_interval needs at least one value")
    generator = random.Random(seed)
    medians = sorted(statistics.median(generator.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
