"""ACNet's asymmetric convolution block (Ding et al. 2019): kxk, 1xk and kx1 conv-BN branches."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.base import ActLayer, Pair, ReparamBlock, fold_chain


class ACBlock(ReparamBlock):
    """``act(BN(conv_kxk(x)) + BN(conv_1xk(x)) + BN(conv_kx1(x)))``, foldable into one kxk conv.

    The 1xk and kx1 kernels strengthen the kernel's central cross; folded, they are centred in the
    kxk kernel (odd ``k``; any stride, dilation and groups). No activation by default (ACNet
    replaces a plain conv-BN); pass ``act_layer=nn.ReLU`` for one.
    """

    branch_names = ("square", "horizontal", "vertical")

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
        act_layer: ActLayer = None,
        **options: Any,
    ) -> None:
        """``options``: ``use_se``, ``deploy``, ``device``, ``dtype`` (see :class:`ReparamBlock`)."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer=act_layer, **options
        )
        if self.deploy:
            return
        (kh, kw) = self.kernel_size
        self.square = self._conv_bn(self.kernel_size, self.padding)
        self.horizontal = self._conv_bn((1, kw), self._centred_padding((1, kw)))
        self.vertical = self._conv_bn((kh, 1), self._centred_padding((kh, 1)))

    def forward_branches(self, x: Tensor) -> Tensor:
        return self.square(x) + self.horizontal(x) + self.vertical(x)

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(self.square), fold_chain(self.horizontal), fold_chain(self.vertical)]
        return algebra.add(ops, names=["kxk", "1xk", "kx1"])
