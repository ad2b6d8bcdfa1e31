"""BatchNorm and channel-wise affine maps (``y = scale * x + shift`` per channel) and their fusion
into a preceding conv or linear."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from trainfer.errors import AlgebraError
from trainfer.reparam.algebra.conv_op import ConvOp


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
