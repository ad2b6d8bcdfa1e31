"""MobileOne block (Vasu et al. 2023): k over-parameterized kxk conv-BN branches, 1x1 scale, identity BN."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainfer.errors import InputError
from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.base import ActLayer, Pair, ReparamBlock, fold_chain, fold_identity_bn


class MobileOneBlock(ReparamBlock):
    """``act(se(sum_i BN_i(conv_kxk_i(x)) + BN(conv_1x1(x)) + BN(x)))``, foldable into one kxk conv.

    ``num_conv_branches`` parallel kxk conv-BN branches (MobileOne-S0 uses 4); the 1x1 "scale"
    branch exists for ``k > 1``; the identity BN where shapes allow (as :class:`RepVGGBlock`).
    In MobileOne a depthwise kxk block (``groups == in_channels``) is followed by a pointwise 1x1 one.
    """

    branch_names = ("dense", "scale", "identity")

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
        num_conv_branches: int = 1,
        act_layer: ActLayer = nn.ReLU,
        **options: Any,
    ) -> None:
        """``options``: ``use_se``, ``deploy``, ``device``, ``dtype`` (see :class:`ReparamBlock`)."""
        if not isinstance(num_conv_branches, int) or num_conv_branches < 1:
            raise InputError(f"MobileOneBlock: num_conv_branches must be a positive int; got {num_conv_branches!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer=act_layer, **options
        )
        self.num_conv_branches = num_conv_branches
        if self.deploy:
            return
        self.dense = nn.ModuleList(self._conv_bn(self.kernel_size, self.padding) for _ in range(num_conv_branches))
        has_scale = self.kernel_size != (1, 1)
        self.scale = self._conv_bn((1, 1), self._centred_padding((1, 1))) if has_scale else None
        self.identity = self._identity_bn()

    def forward_branches(self, x: Tensor) -> Tensor:
        y = sum(branch(x) for branch in self.dense)
        if self.scale is not None:
            y = y + self.scale(x)
        return y + self.identity(x) if self.identity is not None else y

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(branch) for branch in self.dense]
        names = [f"kxk #{i}" for i in range(len(ops))]
        if self.scale is not None:
            ops.append(fold_chain(self.scale))
            names.append("1x1 scale")
        if self.identity is not None:
            ops.append(fold_identity_bn(self.identity, self.groups, self.dilation))
            names.append("identity")
        return algebra.add(ops, names=names)
