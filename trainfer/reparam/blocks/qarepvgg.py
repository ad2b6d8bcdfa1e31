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

from torch import Tensor, nn

from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.base import fold_chain
from trainfer.reparam.blocks.repvgg import RepVGGBlock


class QARepVGGBlock(RepVGGBlock):
    """``act(se(BN_post(BN(conv_kxk(x)) + conv_1x1(x) + x)))``, foldable into one kxk conv.

    Built like :class:`~trainfer.reparam.blocks.RepVGGBlock` (same arguments, identity where shapes
    allow, ``act_layer`` default ``nn.ReLU``); only the branches differ.
    """

    branch_names = ("dense", "pointwise", "has_identity", "post_bn")

    def _build_branches(self) -> None:
        self.dense = self._conv_bn(self.kernel_size, self.padding)
        self.pointwise = self._conv(self.out_channels, (1, 1), self._centred_padding((1, 1)))
        self.has_identity = self._identity_fits()
        self.post_bn = nn.BatchNorm2d(self.out_channels, **self.factory_kwargs)

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.pointwise(x)
        return self.post_bn(y + x if self.has_identity else y)

    def fused_op(self) -> ConvOp:
        ops = [fold_chain(self.dense), fold_chain(self.pointwise)]
        if self.has_identity:
            ref = ops[0].weight
            ops.append(
                algebra.identity(self.in_channels, 1, self.groups, self.dilation, dtype=ref.dtype, device=ref.device)
            )
        return algebra.fuse_bn(algebra.add(ops, names=["kxk", "1x1", "identity"]), self.post_bn)
