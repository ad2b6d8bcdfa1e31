"""Diverse Branch Block (Ding et al. 2021): kxk, 1x1, 1x1->kxk and 1x1->avg-pool, each with BN."""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from trainfer.errors import InputError
from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.base import ActLayer, Pair, ReparamBlock, fold_chain


class DiverseBranchBlock(ReparamBlock):
    """``act(dense(x) + pointwise(x) + pointwise_dense(x) + pointwise_avg(x))``, foldable into one kxk conv.

    * ``dense``: kxk conv-BN; ``pointwise``: 1x1 conv-BN;
    * ``pointwise_dense``: 1x1 conv (``internal_channels``, default ``in_channels``) - BN - kxk conv - BN;
    * ``pointwise_avg``: 1x1 conv - BN - kxk average pooling - BN.

    The two sequential branches use DBB's "BN and pad" form with standard modules: the 1x1 conv
    carries the block's padding and the kxk conv / pool pads nothing, so border pixels see the
    first BN's shift exactly as the interior does (see :func:`trainfer.reparam.algebra.sequential`).
    Average pooling has no dilation: ``dilation`` must be 1. No activation by default.
    """

    branch_names = ("dense", "pointwise", "pointwise_dense", "pointwise_avg")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Pair = 3,
        stride: int | Pair = 1,
        padding: int | Pair | None = None,
        dilation: int | Pair = 1,
        groups: int = 1,
        *,
        internal_channels: int | None = None,
        act_layer: ActLayer = None,
        **options: Any,
    ) -> None:
        """``options``: ``use_se``, ``deploy``, ``device``, ``dtype`` (see :class:`ReparamBlock`)."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer=act_layer, **options
        )
        if self.dilation != (1, 1):
            raise InputError(f"DiverseBranchBlock: the average-pooling branch has no dilation; got {self.dilation}")
        internal = internal_channels if internal_channels is not None else in_channels
        if not isinstance(internal, int) or internal < 1 or internal % groups:
            raise InputError(
                f"DiverseBranchBlock: internal_channels must be a positive multiple of groups={groups}; "
                f"got {internal!r}"
            )
        self.internal_channels = internal
        if self.deploy:
            return
        bn = functools.partial(nn.BatchNorm2d, out_channels, **self.factory_kwargs)
        self.dense = self._conv_bn(self.kernel_size, self.padding)
        self.pointwise = self._conv_bn((1, 1), self._centred_padding((1, 1)))
        self.pointwise_dense = nn.Sequential(
            OrderedDict(
                conv1=self._pointwise_padded(internal),
                bn1=nn.BatchNorm2d(internal, **self.factory_kwargs),
                conv2=nn.Conv2d(
                    internal,
                    out_channels,
                    self.kernel_size,
                    self.stride,
                    0,
                    groups=groups,
                    bias=False,
                    **self.factory_kwargs,
                ),
                bn2=bn(),
            )
        )
        self.pointwise_avg = nn.Sequential(
            OrderedDict(
                conv=self._pointwise_padded(out_channels),
                bn1=bn(),
                pool=nn.AvgPool2d(self.kernel_size, self.stride, 0),
                bn2=bn(),
            )
        )

    def _pointwise_padded(self, out_channels: int) -> nn.Conv2d:
        """The 1x1 conv that starts a sequential branch, padding for the kxk op after it."""
        return self._conv(out_channels, (1, 1), self.padding, stride=(1, 1))

    def forward_branches(self, x: Tensor) -> Tensor:
        return self.dense(x) + self.pointwise(x) + self.pointwise_dense(x) + self.pointwise_avg(x)

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(getattr(self, name)) for name in self.branch_names]
        return algebra.add(ops, names=["kxk", "1x1", "1x1-kxk", "1x1-avg"])
