"""How close two forms of a model must be: the one tolerance table, and the error it bounds.

Every comparison in trainfer (``verify``, ``deploy``, export checks, runtimes, inspection, the
accuracy gate's float check) measures :func:`relative_error` and accepts it up to
``TOLERANCE[dtype]`` of the least precise dtype involved.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Relative error (max |a - b| / max |b|) accepted per dtype when two forms are compared: rounding
#: of the dtype times the depth of a typical network (float16 keeps 11 bits, bfloat16 8).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

__all__ = ["TOLERANCE", "relative_error", "tolerance_for"]


def tolerance_for(dtype: torch.dtype) -> float:
    """``TOLERANCE[dtype]``, or float32's for a dtype without an entry (integers, quantized)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def relative_error(candidate: Tensor, reference: Tensor) -> float:
    """``max |candidate - reference| / max |reference|`` (error relative to the output scale)."""
    scale = reference.detach().abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return float((candidate.detach() - reference.detach()).abs().max() / scale)
