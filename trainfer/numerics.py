"""How close two forms of a model must be: the one tolerance table, the error it bounds, and the
BatchNorm statistics that make such a comparison mean something.

Every comparison in trainfer (``verify``, ``deploy``, export checks, runtimes, inspection, the
accuracy gate's float check) measures :func:`relative_error` and accepts it up to
``TOLERANCE[dtype]`` of the least precise dtype involved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Relative error (max |a - b| / max |b|) accepted per dtype when two forms are compared: rounding
#: of the dtype times the depth of a typical network (float16 keeps 11 bits, bfloat16 8).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

__all__ = ["TOLERANCE", "randomize_batchnorm", "relative_error", "tolerance_for"]


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
