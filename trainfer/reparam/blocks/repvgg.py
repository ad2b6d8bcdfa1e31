"""RepVGG block (Ding et al. 2021): kxk conv-BN + 1x1 conv-BN + identity BN, then SE and ReLU."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.base import ActLayer, Pair, ReparamBlock, fold_chain, fold_identity_bn


class RepVGGBlock(ReparamBlock):
    """``act(se(BN(conv_kxk(x)) + BN(conv_1x1(x)) + BN(x)))``, foldable into one kxk conv.

    The identity branch exists only where it can: ``in_channels == out_channels``, stride 1 and
    size-preserving padding; otherwise the block silently has two branches, as in the paper.
    ``act_layer`` defaults to ``nn.ReLU``; ``use_se`` adds squeeze-excitation after the sum.
    """

    branch_names: tuple[str, ...] = ("dense", "pointwise", "identity")
    #: The 1x1 branch: conv-BN here, a plain conv in :class:`~trainfer.reparam.blocks.QARepVGGBlock`.
    pointwise: nn.Module

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
        act_layer: ActLayer = nn.ReLU,
        **options: Any,
    ) -> None:
        """``options``: ``use_se``, ``deploy``, ``device``, ``dtype`` (see :class:`ReparamBlock`)."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, act_layer=act_layer, **options
        )
        if not self.deploy:
            self._build_branches()

    def _build_branches(self) -> None:
        self.dense = self._conv_bn(self.kernel_size, self.padding)
        self.pointwise = self._conv_bn((1, 1), self._centred_padding((1, 1)))
        self.identity = self._identity_bn()

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.pointwise(x)
        return y + self.identity(x) if self.identity is not None else y

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(self.dense), fold_chain(self.pointwise)]
        if self.identity is not None:
            ops.append(fold_identity_bn(self.identity, self.groups, self.dilation))
        return algebra.add(ops, names=["kxk", "1x1", "identity"])
