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

Modules by concept: :mod:`~trainfer.reparam.algebra.conv_op` (the operator, to and from modules),
:mod:`~trainfer.reparam.algebra.affine` (BatchNorm and per-channel affine maps),
:mod:`~trainfer.reparam.algebra.kernels` (identity, average pooling, crops as kernels),
:mod:`~trainfer.reparam.algebra.reshape` (kernel and input padding, dilation, groups) and
:mod:`~trainfer.reparam.algebra.combine` (branch sums, chains). This package re-exports them all.
"""

from trainfer.errors import AlgebraError
from trainfer.reparam.algebra.affine import (
    batch_norm_affine,
    bn_affine,
    channel_affine,
    fuse_bn,
    fuse_linear_bn,
    scale,
)
from trainfer.reparam.algebra.combine import add, align_pointwise_dilation, sequential
from trainfer.reparam.algebra.conv_op import ConvOp, pair, to_conv2d, to_linear
from trainfer.reparam.algebra.kernels import avg_pool, crop, crop_input, identity
from trainfer.reparam.algebra.reshape import pad_input, pad_kernel, regroup, undilated

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
