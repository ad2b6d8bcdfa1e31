"""The exact kernel algebra behind every fold in trainfer.

Everything here is a pure function on tensors. The central object is :class:`ConvOp`, an affine
2-D convolution

    y = conv2d(x, weight, stride, padding, dilation, groups) + bias        (zero padding)

Blocks (``trainfer.blocks``) and the automatic folder (``trainfer.reparam.fold``) both express a linear
region as a composition of these functions and turn the result back into one ``nn.Conv2d`` (or
``nn.Linear``) with :func:`to_conv2d` / :func:`to_linear`. A rule (how a 1x1 kernel sits inside a
3x3, when a bias meets zero padding, ...) therefore lives in exactly one place.

Every function either returns an exactly equivalent operator or raises :class:`AlgebraError`
(a ``ValueError``) that says which condition failed; it never returns an approximate kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from trainfer.errors import AlgebraError

Pair = tuple[int, int]

__all__ = [
    "AlgebraError",
    "ConvOp",
    "add",
    "align_pointwise_dilation",
    "avg_pool",
    "batch_norm_affine",
    "bn_affine",
    "channel_affine",
    "crop",
    "crop_input",
    "fuse_bn",
    "fuse_linear_bn",
    "identity",
    "pad_input",
    "pair",
    "pad_kernel",
    "regroup",
    "scale",
    "sequential",
    "to_conv2d",
    "to_linear",
    "undilated",
]


def pair(value: int | Sequence[int]) -> Pair:
    """A conv or pool size argument (``stride=2``, ``padding=(1, 0)``) as ``(height, width)`` ints."""
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


_pair = pair  # the spelling the rest of this module uses


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
            padding = _resolve_string_padding(padding, _pair(tuple(weight.shape[2:])), _pair(dilation))
        bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
        return cls(weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups))


def _resolve_string_padding(mode: str, kernel_size: Pair, dilation: Pair) -> Pair:
    if mode == "valid":
        return (0, 0)
    total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if any(t % 2 for t in total):
        raise AlgebraError(f"padding='same' with kernel {tuple(kernel_size)} pads asymmetrically")
    return (total[0] // 2, total[1] // 2)


# --- BatchNorm and channel-wise affine maps -------------------------------------------------------


def batch_norm_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """BatchNorm in eval mode as ``y = scale * x + shift`` per channel.

    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` (``gamma = 1``,
    ``beta = 0`` without affine parameters).
    """
    scale_ = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale_ = scale_ * weight
    shift = -running_mean * scale_
    if bias is not None:
        shift = shift + bias
    return scale_, shift


def bn_affine(bn: nn.modules.batchnorm._NormBase) -> tuple[Tensor, Tensor]:
    """A BatchNorm module in eval mode as ``(scale, shift)`` (:func:`batch_norm_affine` of its statistics).

    Raises :class:`AlgebraError` for ``track_running_stats=False``: such a module has no fixed affine map.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise AlgebraError(
            f"{type(bn).__name__} has track_running_stats=False: it normalises with batch statistics "
            "even in eval mode and cannot be folded"
        )
    weight = bn.weight.detach() if bn.weight is not None else None
    bias = bn.bias.detach() if bn.bias is not None else None
    return batch_norm_affine(bn.running_mean, bn.running_var, weight, bias, bn.eps)


def channel_affine(op: ConvOp, scale_: float | Tensor, shift: Tensor | None = None) -> ConvOp:
    """Follow ``op`` by ``y -> scale * y + shift`` per output channel (BatchNorm, layer scale).

    ``W' = scale[o] * W[o]`` and ``b' = scale[o] * b[o] + shift[o]``. ``scale`` may be a scalar.
    """
    factor = torch.as_tensor(scale_, dtype=op.weight.dtype, device=op.weight.device)
    factor = factor.reshape(-1).expand(op.out_channels) if factor.numel() == 1 else factor.reshape(-1)
    if factor.numel() != op.out_channels:
        raise AlgebraError(f"channel scale has {factor.numel()} entries, the conv has {op.out_channels} outputs")
    bias = op.bias * factor
    if shift is not None:
        bias = bias + torch.as_tensor(shift, dtype=bias.dtype, device=bias.device).reshape(-1)
    return replace(op, weight=op.weight * factor.reshape(-1, 1, 1, 1), bias=bias)


def scale(op: ConvOp, factor: float | Tensor) -> ConvOp:
    """Multiply the operator's output by a constant (scalar or per-channel)."""
    return channel_affine(op, factor)


def fuse_bn(op: ConvOp, bn: nn.modules.batchnorm._NormBase) -> ConvOp:
    """Conv followed by BatchNorm (any ``_BatchNorm`` incl. ``SyncBatchNorm``) in eval mode."""
    if bn.num_features != op.out_channels:
        raise AlgebraError(f"BatchNorm has {bn.num_features} features, the conv has {op.out_channels} outputs")
    return channel_affine(op, *bn_affine(bn))


def fuse_linear_bn(weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._NormBase) -> tuple[Tensor, Tensor]:
    """Linear followed by BatchNorm1d: ``W' = scale[:, None] * W``, ``b' = scale * b + shift``."""
    scale_, shift = bn_affine(bn)
    if scale_.numel() != weight.shape[0]:
        raise AlgebraError(f"BatchNorm has {scale_.numel()} features, the linear has {weight.shape[0]} outputs")
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return weight * scale_[:, None], bias * scale_ + shift


# --- Operators that are convolutions in disguise -------------------------------------------------


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
    kh, kw = _pair(kernel_size)
    if kh % 2 == 0 or kw % 2 == 0:
        raise AlgebraError(f"identity needs an odd kernel to have a centre; got {(kh, kw)}")
    fill = torch.zeros(kh, kw, dtype=dtype, device=device)
    fill[kh // 2, kw // 2] = 1
    dh, dw = _pair(dilation)
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
    kh, kw = _pair(kernel_size)
    fill = torch.full((kh, kw), 1.0 / (kh * kw), dtype=dtype, device=device)
    weight = _diagonal_kernel(channels, groups or channels, (kh, kw), fill)
    stride_ = _pair(stride if stride is not None else kernel_size)
    return ConvOp(weight, weight.new_zeros(channels), stride_, _pair(padding), (1, 1), groups or channels)


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


# --- Reshaping operators so that they can be combined ---------------------------------------------


def pad_kernel(op: ConvOp, kernel_size: int | Sequence[int], name: str = "branch") -> ConvOp:
    """Embed a smaller (possibly asymmetric, e.g. 1x3) kernel centred in a larger one.

    Equivalent iff the size difference is even in each dimension; the padding grows by
    ``dilation * (K - k) / 2`` so the output is unchanged.
    """
    target = _pair(kernel_size)
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


# --- Combining operators --------------------------------------------------------------------------


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
