"""Reshaping operators so that they can be combined: larger kernels, absorbed input padding,
dilation 1, fewer groups; each computes exactly what it was given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from trainfer.errors import AlgebraError
from trainfer.reparam.algebra.conv_op import ConvOp, pair


def pad_kernel(op: ConvOp, kernel_size: int | Sequence[int], name: str = "branch") -> ConvOp:
    """Embed a smaller (possibly asymmetric, e.g. 1x3) kernel centred in a larger one.

    Equivalent iff the size difference is even in each dimension; the padding grows by
    ``dilation * (K - k) / 2`` so the output is unchanged.
    """
    target = pair(kernel_size)
    grow = [t - k for t, k in zip(target, op.kernel_size)]
    if any(g < 0 or g % 2 for g in grow):
        raise AlgebraError(
            f"{name}: kernel {op.kernel_size} cannot be centred in {target} (difference must be even and >= 0)"
        )
    if grow == [0, 0]:
        return op
    gh, gw = grow[0] // 2, grow[1] // 2
    weight = nn.functional.pad(op.weight, (gw, gw, gh, gh))
    padding = (op.padding[0] + op.dilation[0] * gh, op.padding[1] + op.dilation[1] * gw)
    return replace(op, weight=weight, padding=padding)


def pad_input(op: ConvOp, pads: Sequence[int]) -> ConvOp:
    """Zero-pad the input (``F.pad`` order ``(left, right, top, bottom)``) before ``op``.

    Only symmetric padding per dimension can be absorbed into ``nn.Conv2d``'s ``padding``.
    """
    left, right, top, bottom = (list(pads) + [0, 0])[:4] if len(pads) == 2 else list(pads)
    if left != right or top != bottom:
        raise AlgebraError(f"asymmetric input padding {tuple(pads)} cannot become a conv's padding")
    return replace(op, padding=(op.padding[0] + top, op.padding[1] + left))


def undilated(op: ConvOp) -> ConvOp:
    """``op`` with dilation 1, computing exactly the same.

    A ``k``-tap kernel with dilation ``d`` reads the inputs ``x[i * s - p + j * d]`` for taps
    ``j = 0 .. k-1``; a ``(k - 1) * d + 1``-tap kernel ``W'`` with ``W'[j * d] = W[j]`` and zeros
    in between reads ``x[i * s - p + t]`` for ``t = 0 .. (k - 1) * d``, the same window with the
    same stride ``s`` and padding ``p``, and its non-zero taps multiply the same inputs by the same
    weights. Per axis, so a ``3x3`` kernel with dilation ``(2, 3)`` becomes ``5x7``. Branches of
    different dilations (UniRepLKNet's dilated reparam block) then share dilation 1 and add up
    (:func:`add`); the zeros cost multiply-adds a dilated conv does not, so use it only where a sum
    needs it.
    """
    if op.dilation == (1, 1):
        return op
    (dh, dw), (kh, kw) = op.dilation, op.kernel_size
    weight = op.weight.new_zeros(*op.weight.shape[:2], (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    weight[:, :, ::dh, ::dw] = op.weight
    return replace(op, weight=weight, dilation=(1, 1))


def regroup(op: ConvOp, groups: int) -> ConvOp:
    """Rewrite a grouped conv with fewer groups (``groups`` must divide ``op.groups``).

    The weight becomes block-diagonal: output channel ``o`` keeps its taps on its own group's
    input channels and zeros elsewhere.
    """
    if groups == op.groups:
        return op
    if op.groups % groups:
        raise AlgebraError(f"cannot regroup a conv with {op.groups} groups into {groups} groups")
    out_per_group = op.out_channels // op.groups
    in_per_group = op.weight.shape[1]
    new_in = op.in_channels // groups
    weight = op.weight.new_zeros(op.out_channels, new_in, *op.kernel_size)
    for g in range(op.groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        start = (g * in_per_group) % new_in
        weight[rows, start : start + in_per_group] = op.weight[rows]
    return replace(op, weight=weight, groups=groups)
