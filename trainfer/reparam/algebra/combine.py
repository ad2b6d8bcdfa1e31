"""Combining operators: the parallel sum of branches (:func:`add`) and the composition of a
chain (:func:`sequential`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from trainfer.errors import AlgebraError
from trainfer.reparam.algebra.conv_op import ConvOp, Pair
from trainfer.reparam.algebra.kernels import _crop_of, crop_input
from trainfer.reparam.algebra.reshape import pad_kernel, regroup


def align_pointwise_dilation(ops: Sequence[ConvOp]) -> list[ConvOp]:
    """Give each branch's 1-tap dimensions the dilation of the branches that have taps there (else 1).

    Dilation spaces taps, so a dimension with one tap (a 1x1 kernel) computes the same for any
    dilation; aligning it lets a 1x1 branch add to a dilated kxk branch (exact, no change in output).
    """
    target = [next((op.dilation[i] for op in ops if op.kernel_size[i] > 1), 1) for i in range(2)]
    return [replace(op, dilation=_dilation_where_pointwise(op, target)) for op in ops]


def _dilation_where_pointwise(op: ConvOp, target: Sequence[int]) -> Pair:
    """``op``'s dilation with ``target``'s in each dimension where ``op`` has one tap."""
    rows, cols = (t if k == 1 else d for t, k, d in zip(target, op.kernel_size, op.dilation))
    return (rows, cols)


def add(ops: Sequence[ConvOp], names: Sequence[str] | None = None) -> ConvOp:
    """The parallel sum ``sum_i op_i(x)`` of branches reading the same input.

    Exact iff all branches share stride and dilation, produce the same number of channels and
    read aligned windows (equal :attr:`ConvOp.offset`). Kernels are centred in the largest one
    and groups reduced to their greatest common divisor.
    """
    names = list(names) if names is not None else [f"branch {i}" for i in range(len(ops))]
    if not ops:
        raise AlgebraError("cannot add zero branches")
    ops = align_pointwise_dilation(ops)
    first = ops[0]
    for op, name in zip(ops[1:], names[1:]):
        for attribute in ("stride", "dilation", "out_channels", "in_channels"):
            if getattr(op, attribute) != getattr(first, attribute):
                raise AlgebraError(
                    f"{name}: {attribute} {getattr(op, attribute)} differs from "
                    f"{names[0]}'s {getattr(first, attribute)}"
                )
        if op.offset != first.offset:
            raise AlgebraError(
                f"{name}: padding {op.padding} with kernel {op.kernel_size} is not aligned with "
                f"{names[0]}'s padding {first.padding} with kernel {first.kernel_size}"
            )
    size = tuple(max(op.kernel_size[i] for op in ops) for i in range(2))
    groups = ops[0].groups
    for op in ops[1:]:
        groups = _gcd(groups, op.groups)
    padded = [regroup(pad_kernel(op, size, name), groups) for op, name in zip(ops, names)]
    weight = torch.stack([op.weight for op in padded]).sum(0)
    bias = torch.stack([op.bias for op in padded]).sum(0)
    return replace(padded[0], weight=weight, bias=bias)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _is_pointwise(op: ConvOp) -> bool:
    return op.kernel_size == (1, 1) and op.stride == (1, 1)


def sequential(first: ConvOp, second: ConvOp) -> ConvOp:
    """The composition ``second(first(x))`` when one of the two is a 1x1 conv, or ``first`` a crop.

    * ``first`` is a :func:`crop`: ``second`` reads the uncropped input (:func:`crop_input`).
    * ``first`` is 1x1 with stride 1 (DBB's 1x1 -> kxk branch):
      ``W[o, c] = sum_m W2[o, m] W1[m, c]`` per tap, ``b = b2 + sum_{m, taps} W2[o, m] b1[m]``,
      padding ``p1 + p2``. If ``second`` zero-pads (``p2 > 0``) while ``b1 != 0``, the border
      pixels would see 0 instead of ``b1``: that is not exact and raises. DBB's "BN and pad"
      trick is the exact form: pad *before* the 1x1 (``p1 > 0``, border = ``b1``) and let the
      kxk conv use ``p2 = 0``.
    * ``second`` is 1x1 with padding 0 (kxk -> 1x1): always exact, strides multiply.

    Groups: both ops are regrouped (:func:`regroup`) to ``gcd(groups1, groups2)`` groups, which
    both are block-diagonal in, and the product is computed per group (a grouped 1x1 followed by
    a depthwise avg-pool stays grouped).
    """
    if first.out_channels != second.in_channels:
        raise AlgebraError(f"first conv gives {first.out_channels} channels, second expects {second.in_channels}")
    cropped = _crop_of(first)
    if cropped is not None:
        return crop_input(second, *cropped)
    if _is_pointwise(first) and first.dilation == (1, 1):
        if second.padding != (0, 0) and bool(first.bias.any()) and first.padding == (0, 0):
            raise AlgebraError(
                "the first conv's bias would meet the second conv's zero padding (border pixels would "
                "differ); pad before the 1x1 conv instead (DBB's BN-and-pad)"
            )
        if second.padding != (0, 0) and first.padding != (0, 0) and bool(first.bias.any()):
            raise AlgebraError("both convs pad and the first has a bias: the border is not a single constant")
        weight, bias = _compose(first, second, second_is_pointwise=False)
        padding = (first.padding[0] + second.padding[0], first.padding[1] + second.padding[1])
        return ConvOp(weight, bias, second.stride, padding, second.dilation, _common_groups(first, second))
    if second.kernel_size == (1, 1) and second.padding == (0, 0):
        weight, bias = _compose(first, second, second_is_pointwise=True)
        stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
        return ConvOp(weight, bias, stride, first.padding, first.dilation, _common_groups(first, second))
    raise AlgebraError(
        f"sequential convs fold only when one is 1x1 (first: kernel {first.kernel_size} stride "
        f"{first.stride}; second: kernel {second.kernel_size} padding {second.padding})"
    )


def _common_groups(first: ConvOp, second: ConvOp) -> int:
    return _gcd(first.groups, second.groups)


def _compose(first: ConvOp, second: ConvOp, *, second_is_pointwise: bool) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``second(first(x))`` where the pointwise one is a channel matrix."""
    groups = _common_groups(first, second)
    first_, second_ = regroup(first, groups), regroup(second, groups)
    out_per_group = second_.out_channels // groups
    mid_per_group = first_.out_channels // groups
    blocks = []
    for g in range(groups):
        w2 = second_.weight[g * out_per_group : (g + 1) * out_per_group]  # (O_g, M_g, k2h, k2w)
        w1 = first_.weight[g * mid_per_group : (g + 1) * mid_per_group]  # (M_g, C_g, k1h, k1w)
        if second_is_pointwise:
            blocks.append(torch.einsum("om,mchw->ochw", w2[:, :, 0, 0], w1))
        else:
            blocks.append(torch.einsum("omhw,mc->ochw", w2, w1[:, :, 0, 0]))
    weight = torch.cat(blocks)
    bias = second.bias + _grouped_bias_term(second, first.bias)
    return weight, bias


def _grouped_bias_term(second: ConvOp, first_bias: Tensor) -> Tensor:
    """``sum_{m in group(o), taps} W2[o, m, taps] b1[m]``: the first bias pushed through ``second``."""
    out_per_group = second.out_channels // second.groups
    in_per_group = second.weight.shape[1]
    grouped_bias = first_bias.reshape(second.groups, in_per_group)
    per_output = grouped_bias.repeat_interleave(out_per_group, dim=0)  # (O, in_per_group)
    return torch.einsum("omhw,om->o", second.weight, per_output)
