"""Benchmarks: measurement primitives (:mod:`~trainfer.bench.measure`) and the comparison of a
model's forms (:mod:`~trainfer.bench.forms`), which ``trainfer bench`` prints."""

from trainfer.bench.forms import FORMS, BenchReport, FormResult, benchmark
from trainfer.bench.measure import (
    Timing,
    count_macs,
    count_parameters,
    num_threads,
    peak_memory,
    time_forms,
    time_forward,
)

__all__ = [
    "FORMS",
    "BenchReport",
    "FormResult",
    "Timing",
    "benchmark",
    "count_macs",
    "count_parameters",
    "num_threads",
    "peak_memory",
    "time_forms",
    "time_forward",
]
