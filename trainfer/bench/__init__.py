"""Benchmarks: measurement primitives (:mod:`~trainfer.bench.measure`) and the comparison of a
model's forms (:mod:`~trainfer.bench.forms`), which ``trainfer bench`` prints. Both re-exported."""

from trainfer.bench import forms, measure
from trainfer.bench.forms import *  # noqa: F403
from trainfer.bench.measure import *  # noqa: F403

__all__ = [*forms.__all__, *measure.__all__]
