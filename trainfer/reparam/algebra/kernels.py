"""Operators that are convolutions in disguise: identity, average pooling and crops as kernels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from trainfer.errors import AlgebraError
from trainfer.reparam.algebra.conv_op import ConvOp, Pair, pair


def _diagonal_kernel(channels: int, groups: int, kernel_size: Pair, fill: Tensor) -> Tensor:
    """A grouped kernel mapping channel ``c`` to itself with taps ``fill`` (shape ``kernel_size``)."""
    if channels % groups:
        raise AlgebraError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    weight = fill.new_zeros(channels, per_group, *kernel_size)
    index = torch.arange(channels, device=fill.device)
    weight[index, index % per_group] = fill
    return weight


def identity(
    channels: int,
    kernel_size: int | Sequence[int] = 1,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ConvOp:
    """The identity map as a (grouped) ``k x k`` conv: a 1 at the kernel centre, ``padding = d (k-1)/2``."""
    kh, kw = pair(kernel_size)
    if kh % 2 == 0 or kw % 2 == 0:
        raise AlgebraError(f"identity needs an odd kernel to have a centre; got {(kh, kw)}")
    fill = torch.zeros(kh, kw, dtype=dtype, device=device)
    fill[kh // 2, kw // 2] = 1
    dh, dw = pair(dilation)
    weight = _diagonal_kernel(channels, groups, (kh, kw), fill)
    padding = (dh * (kh // 2), dw * (kw // 2))
    return ConvOp(weight, weight.new_zeros(channels), (1, 1), padding, (dh, dw), groups)


def avg_pool(
    channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    groups: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ConvOp:
    """``AvgPool2d(k, stride, padding, count_include_pad=True)`` as a conv with taps ``1 / (kh kw)``.

    Only ``count_include_pad=True`` is linear-in-a-fixed-kernel at the border, so only that is
    accepted (callers check the flag). ``groups`` defaults to depthwise.
    """
    kh, kw = pair(kernel_size)
    fill = torch.full((kh, kw), 1.0 / (kh * kw), dtype=dtype, device=device)
    weight = _diagonal_kernel(channels, groups or channels, (kh, kw), fill)
    stride_ = pair(stride if stride is not None else kernel_size)
    return ConvOp(weight, weight.new_zeros(channels), stride_, pair(padding), (1, 1), groups or channels)


def crop(
    channels: int,
    rows: int,
    cols: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ConvOp:
    """``x[:, :, rows:-rows, cols:-cols]`` (0: that dimension uncropped) as a depthwise conv.

    One tap of 1 at the centre of a ``(2 rows + 1) x (2 cols + 1)`` kernel, no padding: output
    pixel ``(i, j)`` reads input ``(i + rows, j + cols)``, and the output is ``2 rows x 2 cols`` smaller.
    """
    centred = identity(channels, (2 * rows + 1, 2 * cols + 1), channels, dtype=dtype, device=device)
    return replace(centred, padding=(0, 0))


def _crop_of(op: ConvOp) -> Pair | None:
    """``(rows, cols)`` if ``op`` is exactly :func:`crop`'s operator, else None."""
    kh, kw = op.kernel_size
    plain = op.stride == op.dilation == (1, 1) and op.padding == (0, 0) and kh % 2 == kw % 2 == 1
    if not plain or op.groups != op.out_channels or op.in_channels != op.out_channels or bool(op.bias.any()):
        return None
    rows, cols = kh // 2, kw // 2
    expected = crop(op.out_channels, rows, cols, dtype=op.weight.dtype, device=op.weight.device)
    return (rows, cols) if torch.equal(op.weight, expected.weight) else None


def crop_input(op: ConvOp, rows: int, cols: int) -> ConvOp:
    """``op`` applied to its input cropped by ``rows``/``cols`` on each side, as one conv on the whole input.

    In a cropped dimension ``op`` must not pad (ACNet's 1xk branches with ``padding < k // 2`` do
    not): cropping ``c`` pixels then padding would put zeros where the whole input has pixels.
    Then output pixel ``j`` reads from ``j * stride + c`` on: the kernel grows by ``c / dilation``
    zero taps on each side (exact iff the dilation divides ``c``), still without padding.
    """
    grow = []
    for c, p, d in zip((rows, cols), op.padding, op.dilation):
        if c and p:
            raise AlgebraError(f"a crop of {c} followed by zero padding {p} is not a conv of the uncropped input")
        if c % d:
            raise AlgebraError(f"a crop of {c} is not a whole number of taps at dilation {d}")
        grow.append(c // d)
    weight = nn.functional.pad(op.weight, (grow[1], grow[1], grow[0], grow[0]))
    return replace(op, weight=weight)
