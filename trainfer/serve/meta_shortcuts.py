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
#: arithmetic on a floating-point tensor and a tensor like it or a real number: a result like the first
ARITHMETIC = frozenset({_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor})


#: ``hardtanh(x, min_val=-1, max_val=1)``: refused where ``min_val > max_val``, else a result like ``x``
BOUNDED = frozenset({_aten.hardtanh.default})


def shortcut(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The meta tensor ``func(*args, **kwargs)`` gives, made without its kernel, or ``None`` where that is not
    known here. With no keyword argument (``gelu``'s default approximation, ``add``'s ``alpha`` of 1) and
    ``x`` a plain meta tensor of a floating-point dtype with the strides of a new contiguous tensor, these
    calls give a new contiguous tensor of ``x``'s shape and dtype and never raise:

    - ``func(x)`` for ``func`` in :data:`SAME_AS_INPUT`;
    - ``func(x, y)`` or ``func(y, x)`` for ``func`` in :data:`ARITHMETIC`, ``y`` a tensor like ``x`` (the
      same shape, dtype and strides), a Python ``float`` or an ``int`` within int64, or (``x`` of at least
      one dimension) a 0-dimensional integer or floating-point tensor: a number of a lower or the same
      category does not promote;
    - ``func(x[, min_val[, max_val]])`` for ``func`` in :data:`BOUNDED`, the bounds Python numbers as above
      with not ``min_val > max_val`` (that call raises: left to the kernel).

    Every other call: ``None``.
    """
    if func in BOUNDED and 1 <= len(args) <= 3 and not kwargs and _dense_float(args[0]):
        bounds: list[Any] = [*args[1:], *[-1, 1][len(args) - 1 :]]
        low, high = bounds
        plain = _number(low) and _number(high) and not low > high
        return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta") if plain else None
    if kwargs or not (func in SAME_AS_INPUT and len(args) == 1 or func in ARITHMETIC and len(args) == 2):
        return None
    for x, y in [(args[0], args[-1]), (args[-1], args[0])]:
        if _dense_float(x) and (len(args) == 1 or _tame(y, x)):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return None


def _dense_float(x: Any) -> bool:
    """A plain strided meta tensor of a floating-point dtype with the strides of a new contiguous tensor."""
    if type(x) is not torch.Tensor or x.device.type != "meta" or not x.is_floating_point() or x.is_neg():
        return False
    return x.layout == torch.strided and x.storage_offset() == 0 and x.stride() == _contiguous(x.shape)


def _number(y: Any) -> bool:
    """A Python ``float`` or an ``int`` within int64 (not a bool, a complex, a bigger int)."""
    return type(y) is float or type(y) is int and -(2**63) <= y < 2**63


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a new contiguous tensor of ``shape`` (1 for a dimension of size 0 or 1 at the end)."""
    return torch.empty(shape, device="meta").stride()


def _tame(y: Any, x: torch.Tensor) -> bool:
    """Whether ``y`` leaves ``x``'s shape, dtype and layout to an arithmetic result with it (see :func:`shortcut`)."""
    if _number(y):
        return True
    if type(y) is not torch.Tensor or y.is_complex() or y.dtype == torch.bool or y.is_neg() or y.is_conj():
        return False
    if y.device == x.device and y.dtype == x.dtype and y.shape == x.shape and _dense_float(y):
        return True
    return y.dim() == 0 < x.dim() and y.layout == torch.strided and y.device.type in ("meta", "cpu")
