"""The operator of the algebra: :class:`ConvOp`, an affine 2-D convolution with zero padding.

Read from an ``nn.Conv2d`` or an ``F.conv2d`` call (:meth:`ConvOp.from_module`,
:meth:`ConvOp.from_call`) and turned back into a module (:func:`to_conv2d`, :func:`to_linear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainfer.errors import AlgebraError

Pair = tuple[int, int]


def pair(value: int | Sequence[int]) -> Pair:
    """A conv or pool size argument (``stride=2``, ``padding=(1, 0)``) as ``(height, width)`` ints."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


@dataclass(frozen=True)
class ConvOp:
    """An affine 2-D convolution with zero padding: ``conv2d(x, weight, ...) + bias``.

    ``weight`` has shape ``(out_channels, in_channels // groups, kh, kw)``; ``bias`` has shape
    ``(out_channels,)`` (always present: a missing bias is zeros).
    """

    weight: Tensor
    bias: Tensor
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def offset(self) -> tuple[float, float]:
        """Where the kernel's centre lands relative to the output pixel's input position.

        Two convolutions with equal stride and dilation read the same input window for every
        output pixel, up to zero taps, iff their offsets ``padding - dilation * (k - 1) / 2`` agree.
        """
        return tuple(  # type: ignore[return-value]
            p - d * (k - 1) / 2 for p, d, k in zip(self.padding, self.dilation, self.kernel_size)
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the operator (used by tests and verification)."""
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_module(cls, conv: nn.Conv2d) -> ConvOp:
        """Read an ``nn.Conv2d`` (zero padding only; ``padding='same'`` only where symmetric)."""
        if conv.padding_mode != "zeros":
            raise AlgebraError(f"only zero padding folds exactly; this conv uses padding_mode={conv.padding_mode!r}")
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls.from_call(conv.weight.detach(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @classmethod
    def from_call(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> ConvOp:
        """The operator of ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``.

        ``padding`` may be ``"valid"`` or ``"same"`` (where symmetric, else :class:`AlgebraError`);
        a missing bias is zeros.
        """
        if isinstance(padding, str):
            padding = _resolve_string_padding(padding, pair(tuple(weight.shape[2:])), pair(dilation))
        bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
        return cls(weight, bias, pair(stride), pair(padding), pair(dilation), int(groups))


def _resolve_string_padding(mode: str, kernel_size: Pair, dilation: Pair) -> Pair:
    if mode == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if any(t % 2 for t in total):
        raise AlgebraError(f"padding='same' with kernel {tuple(kernel_size)} pads asymmetrically")
    return (total[0] // 2, total[1] // 2)


# --- Back to modules ------------------------------------------------------------------------------


def to_conv2d(op: ConvOp, *, bias: bool = True) -> nn.Conv2d:
    """An ``nn.Conv2d`` computing ``op`` with ``op``'s dtype and device."""
    conv = nn.Conv2d(
        op.in_channels,
        op.out_channels,
        op.kernel_size,
        stride=op.stride,
        padding=op.padding,
        dilation=op.dilation,
        groups=op.groups,
        bias=bias,
        device=op.weight.device,
        dtype=op.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(op.weight)
        if conv.bias is not None:  # bias=True
            conv.bias.copy_(op.bias)
        elif bool(op.bias.any()):
            raise AlgebraError("bias=False requested for an operator with a non-zero bias")
    return conv


def to_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` with the given weight ``(out, in)`` and bias, same dtype and device."""
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
