"""Test helpers for proving two forms equal: non-trivial BatchNorm statistics and assertions.

Used by trainfer's own tests and benchmarks, and public so users can check their models the same
way; nothing in the library imports it. The tolerance table and the op counter it re-exports live
in :mod:`trainfer.numerics` and :mod:`trainfer.opcount`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainfer.numerics import TOLERANCE, relative_error
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


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters, in place.

    Fresh BatchNorm is the identity in eval mode (mean 0, var 1, gamma 1, beta 0), so an
    equivalence check on it proves nothing about the folding of statistics.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                continue
            if module.running_mean is None or module.running_var is None:
                continue
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
            module.running_var.copy_(_uniform(shape, 0.5, 2.0, generator))
            if module.weight is not None and module.bias is not None:  # affine: both
                module.weight.copy_(_uniform(shape, 0.5, 1.5, generator))
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.5)
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.fill_(100)
    return model


def _uniform(shape: torch.Size, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


def assert_close(candidate: Tensor, reference: Tensor, tolerance: float | None = None) -> float:
    """Assert equal shapes and relative error within ``TOLERANCE[dtype]``; return the error."""
    assert candidate.shape == reference.shape, f"shape {tuple(candidate.shape)} != {tuple(reference.shape)}"
    error = relative_error(candidate, reference)
    limit = tolerance if tolerance is not None else TOLERANCE[reference.dtype]
    assert error <= limit, f"relative error {error:.3e} exceeds {limit:.0e} ({reference.dtype})"
    return error
