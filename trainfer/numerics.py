"""How close two forms of a model must be: the one tolerance table, the error it bounds, and the
BatchNorm statistics that make such a comparison mean something; and whether numbers are finite.

Every comparison in trainfer (``verify``, ``deploy``, export checks, runtimes, inspection, the
accuracy gate's float check) measures :func:`relative_error` and accepts it up to
``TOLERANCE[dtype]`` of the least precise dtype involved.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

#: Relative error (max |a - b| / max |b|) accepted per dtype when two forms are compared: rounding
#: of the dtype times the depth of a typical network (float16 keeps 11 bits, bfloat16 8).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

#: The torch dtypes whose CPU tensors NumPy can view without a copy (bfloat16 it cannot).
NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
_ALL = np.logical_and.reduce

__all__ = [
    "NUMPY_FLOATS",
    "TOLERANCE",
    "all_finite",
    "all_finite_array",
    "numpy_view",
    "randomize_batchnorm",
    "relative_error",
    "tolerance_for",
]


def tolerance_for(dtype: torch.dtype) -> float:
    """``TOLERANCE[dtype]``, or float32's for a dtype without an entry (integers, quantized)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def relative_error(candidate: Tensor, reference: Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` (error relative to the output scale)."""
    scale = reference.detach().abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((candidate.detach() - reference.detach()).abs().max() / scale)


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


def all_finite_array(array: np.ndarray) -> bool:
    """Whether ``array`` holds no NaN and no infinity: one pass in C, without the warning state a sum
    would need or the Python wrapper of ``ndarray.all`` (a request's few numbers: under a microsecond)."""
    return bool(_ALL(np.isfinite(array), axis=None))


def all_finite(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no infinity: :func:`all_finite_array` on its
    :func:`numpy_view` where it has one (a quarter of torch's per-call cost on a small tensor; the same
    IEEE test), ``torch.isfinite`` otherwise."""
    array = numpy_view(tensor)
    return all_finite_array(array) if array is not None else bool(torch.isfinite(tensor).all())


def numpy_view(tensor: Tensor) -> np.ndarray | None:
    """``tensor``'s memory as a NumPy array (no copy) when it is a CPU tensor of :data:`NUMPY_FLOATS`
    outside autograd, else None."""
    if tensor.device.type == "cpu" and tensor.dtype in NUMPY_FLOATS and not tensor.requires_grad:
        return tensor.numpy()
    return None
