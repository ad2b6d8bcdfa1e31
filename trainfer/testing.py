"""Test helpers for proving two forms equal: non-trivial BatchNorm statistics and assertions.

Used by trainfer's own tests and benchmarks, and public so users can check their models the same
way; nothing in the library imports it. The tolerance table, ``randomize_batchnorm`` and the op
counter it re-exports live in :mod:`trainfer.numerics` and :mod:`trainfer.opcount`.
"""

from __future__ import annotations

from torch import Tensor

from trainfer.numerics import TOLERANCE, randomize_batchnorm, relative_error
from trainfer.opcount import BATCH_NORM_OPS, AtenOpCounter, batch_norm_calls, count_aten_ops

__all__ = [
    "BATCH_NORM_OPS",
    "TOLERANCE",
    "AtenOpCounter",
    "assert_close",
    "batch_norm_calls",
    "count_aten_ops",
    "randomize_batchnorm",
    "relative_error",
]


def assert_close(candidate: Tensor, reference: Tensor, tolerance: float | None = None) -> float:
    """Assert equal shapes and relative error within ``TOLERANCE[dtype]``; return the error."""
    assert candidate.shape == reference.shape, f"shape {tuple(candidate.shape)} != {tuple(reference.shape)}"
    error = relative_error(candidate, reference)
    limit = tolerance if tolerance is not None else TOLERANCE[reference.dtype]
    assert error <= limit, f"relative error {error:.3e} exceeds {limit:.0e} ({reference.dtype})"
    return error
