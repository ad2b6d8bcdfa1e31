"""Results of a few aten ops on the meta device made directly instead of by their meta kernels, which for
these ops are PyTorch's Python reference decompositions (``torch._refs``: ``relu`` runs ``torch.where``
through several prims, ~0.5 to 2 ms a call) (see :func:`shortcut`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["shortcut"]

_aten = torch.ops.aten
#: activations of one floating-point tensor whose meta result has its shape, dtype and dense layout
SAME_AS_INPUT = frozenset(
    {_aten.relu.default, _aten.hardswish.default, _aten.hardsigmoid.default, _aten.mish.default, _aten.gelu.default}
)


def shortcut(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The meta tensor ``func(*args, **kwargs)`` gives, made without its kernel, or ``None`` where that is not
    known here: ``func`` in :data:`SAME_AS_INPUT`, called on one plain meta tensor of a floating-point dtype
    with the strides of a new contiguous tensor and no other argument (``gelu``'s default approximation),
    gives a new contiguous tensor of that shape and dtype and never raises (every other call: ``None``).
    """
    if func not in SAME_AS_INPUT or len(args) != 1 or kwargs:
        return None
    (x,) = args
    if type(x) is not torch.Tensor or x.device.type != "meta" or not x.is_floating_point() or x.is_neg():
        return None
    out = torch.empty(x.shape, dtype=x.dtype, device="meta")
    return out if out.stride() == x.stride() and x.storage_offset() == 0 and x.layout == torch.strided else None
