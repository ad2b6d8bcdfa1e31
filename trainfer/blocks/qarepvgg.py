"""QARepVGG block (Chu et al., AAAI 2023 "Make RepVGG Greater Again"): a quantization-friendly RepVGG.

RepVGG's folded kernel is quantization-hostile: each branch's BatchNorm rescales its kernel per
channel by ``gamma / sigma``, and the identity BN adds ``gamma / sigma`` on the centre tap, so a
few channels of the sum get outsized weights (per-channel outliers) while the activations'
spread grows with depth. QARepVGG keeps BN only on the kxk branch, drops it (and the bias) from
the 1x1 branch and the identity, and normalises the sum instead:

    act(se(BN_post(BN(conv_kxk(x)) + conv_1x1(x) + x)))

The fold uses the same algebra as every block: ``fuse_bn(add([kxk-BN, 1x1, identity]), BN_post)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainfer import algebra
from trainfer.algebra import ConvOp
from trainfer.blocks.base import ActLayer, Pair, ReparamBlock, fold_chain


class QARepVGGBlock(ReparamBlock):
    """``act(se(BN_post(BN(conv_kxk(x)) + conv_1x1(x) + x)))``, foldable into one kxk conv.

    The identity branch exists where shapes allow (as :class:`~trainfer.blocks.RepVGGBlock`);
    ``act_layer`` defaults to ``nn.ReLU``.
    """

    branch_names = ("dense", "pointwise", "has_identity", "post_bn")

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
        if self.deploy:
            return
        self.dense = self._conv_bn(self.kernel_size, self.padding)
        self.pointwise = self._conv(out_channels, (1, 1), self._centred_padding((1, 1)))
        self.has_identity = self._identity_bn() is not None
        self.post_bn = nn.BatchNorm2d(out_channels, **self.factory_kwargs)

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.pointwise(x)
        return self.post_bn(y + x if self.has_identity else y)

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(self.dense), ConvOp.from_module(self.pointwise)]
        if self.has_identity:
            ref = self.post_bn.running_mean
            ops.append(
                algebra.identity(self.in_channels, 1, self.groups, self.dilation, dtype=ref.dtype, device=ref.device)
            )
        return algebra.fuse_bn(algebra.add(ops, names=["kxk", "1x1", "identity"]), self.post_bn)
