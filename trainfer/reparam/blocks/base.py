"""What every re-parameterizable block shares: the conv-like constructor, the deploy switch, folding.

A block is a sum of linear branches (convolutions, BatchNorm, average pooling, identity) followed by
optional squeeze-excitation and an activation. In training it runs the branches; after
:meth:`ReparamBlock.reparameterize` it runs one ``nn.Conv2d`` (``reparam``) computing the same sum
exactly. The branch-specific part of a subclass is only: build the branches, sum them in
``forward_branches``, and say in ``fused_op`` how they combine through :mod:`trainfer.algebra`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.errors import InputError
from trainfer.reparam import algebra
from trainfer.reparam.algebra import ConvOp
from trainfer.reparam.blocks.activations import ActLayer, activation_factory
from trainfer.reparam.blocks.se import SqueezeExcite

Pair = tuple[int, int]


class FactoryKwargs(TypedDict):
    """Where and in which dtype a block creates its parameters (``nn.Conv2d``'s factory arguments)."""

    device: torch.device | str | None
    dtype: torch.dtype | None


def pair(value: int | Iterable[int], name: str) -> Pair:
    """``3 -> (3, 3)``; anything but an int or a pair of ints raises ``ValueError`` naming ``name``."""
    result = (value, value) if isinstance(value, int) else tuple(value)
    if len(result) != 2 or not all(isinstance(v, int) for v in result):
        raise InputError(f"{name} must be an int or a pair of ints; got {value!r}")
    return (result[0], result[1])


def same_padding(kernel_size: Pair, dilation: Pair) -> Pair:
    """The padding that keeps the spatial size at stride 1: ``d (k - 1) / 2``."""
    return (dilation[0] * (kernel_size[0] - 1) // 2, dilation[1] * (kernel_size[1] - 1) // 2)


def fold_chain(branch: nn.Module) -> ConvOp:
    """Compose a branch, an ``nn.Sequential`` chain of ``Conv2d`` / BatchNorm (incl. ``SyncBatchNorm``) /
    ``AvgPool2d`` or one ``Conv2d``, into one ConvOp.

    BatchNorm contributes its running statistics (eval mode); pooling must count padding.
    """
    op: ConvOp | None = None
    for module in branch if isinstance(branch, nn.Sequential) else [branch]:
        if isinstance(module, nn.Conv2d):
            step = ConvOp.from_module(module)
            op = step if op is None else algebra.sequential(op, step)
        elif isinstance(module, _BatchNorm) and op is not None:
            op = algebra.fuse_bn(op, module)
        elif isinstance(module, nn.AvgPool2d) and op is not None and module.count_include_pad:
            ref = op.weight
            pool = algebra.avg_pool(
                op.out_channels, module.kernel_size, module.stride, module.padding, dtype=ref.dtype, device=ref.device
            )
            op = algebra.sequential(op, pool)
        else:
            raise InputError(f"cannot fold {type(module).__name__} at this place of a branch")
    if op is None:
        raise InputError("cannot fold an empty branch")
    return op


def fold_identity_bn(bn: _BatchNorm, groups: int, dilation: Pair) -> ConvOp:
    """BatchNorm on the identity (the skip branch) as a grouped 1x1 conv with the block's dilation."""
    scale, shift = algebra.bn_affine(bn)
    op = algebra.identity(bn.num_features, 1, groups, dilation, dtype=scale.dtype, device=scale.device)
    return algebra.channel_affine(op, scale, shift)


class ReparamBlock(nn.Module):
    """Base of the re-parameterizable blocks; constructor arguments follow ``nn.Conv2d``.

    ``padding=None`` means ``dilation * (kernel_size - 1) / 2`` (the output keeps the input size at
    stride 1). Kernels must be odd: branches with smaller kernels are centred in the large one.
    ``deploy=True`` builds only the fused conv ``reparam`` (to load a deploy checkpoint directly).
    The output is ``act(se(sum of branches))``; ``use_se`` adds :class:`SqueezeExcite`, kept as its
    own module after the fused conv (it is not linear).
    """

    #: Names of the training-only submodules, freed by :meth:`reparameterize`.
    branch_names: tuple[str, ...] = ()

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
        use_se: bool = False,
        act_layer: ActLayer = None,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.padding = same_padding(self.kernel_size, self.dilation) if padding is None else pair(padding, "padding")
        self.factory_kwargs = FactoryKwargs(device=device, dtype=dtype)
        self._check()
        self.se = SqueezeExcite(out_channels, **self.factory_kwargs) if use_se else nn.Identity()
        make_act = activation_factory(act_layer)
        self.act = make_act() if make_act is not None else nn.Identity()
        self.reparam = self._conv(out_channels, self.kernel_size, self.padding, bias=True) if deploy else None

    def _check(self) -> None:
        """Raise ``ValueError`` naming the problem for configurations no exact fold exists for."""
        name = type(self).__name__
        sizes = {"in_channels": self.in_channels, "out_channels": self.out_channels, "groups": self.groups}
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: {key} must be a positive int; got {value!r}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise InputError(
                f"{name}: in_channels={self.in_channels} and out_channels={self.out_channels} "
                f"must both be divisible by groups={self.groups}"
            )
        for key in ("kernel_size", "stride", "dilation"):
            if min(getattr(self, key)) < 1:
                raise InputError(f"{name}: {key} must be positive; got {getattr(self, key)}")
        if any(k % 2 == 0 for k in self.kernel_size):
            raise InputError(
                f"{name}: kernel_size must be odd (smaller branches are centred in it); got {self.kernel_size}"
            )
        least = same_padding(self.kernel_size, self.dilation)
        if any(p < q for p, q in zip(self.padding, least)):
            raise InputError(
                f"{name}: padding {self.padding} is smaller than dilation*(kernel_size-1)/2 = {least}; "
                "the smaller branches could not be aligned with the kxk conv"
            )

    def _conv(
        self, out_channels: int, kernel_size: Pair, padding: Pair, *, bias: bool = False, stride: Pair | None = None
    ) -> nn.Conv2d:
        """A conv reading the block's input with the block's dilation, groups and stride (unless given)."""
        stride = self.stride if stride is None else stride
        return nn.Conv2d(
            self.in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            self.dilation,
            self.groups,
            bias,
            **self.factory_kwargs,
        )

    def _conv_bn(self, kernel_size: Pair, padding: Pair) -> nn.Sequential:
        """A conv-BN branch reading the block's input: kernel ``kernel_size`` centred with ``padding``."""
        return nn.Sequential(
            OrderedDict(
                conv=self._conv(self.out_channels, kernel_size, padding),
                bn=nn.BatchNorm2d(self.out_channels, **self.factory_kwargs),
            )
        )

    def _centred_padding(self, kernel_size: Pair) -> Pair:
        """Padding that aligns a smaller kernel's centre with the kxk conv's centre."""
        big, small = same_padding(self.kernel_size, self.dilation), same_padding(kernel_size, self.dilation)
        return (self.padding[0] - big[0] + small[0], self.padding[1] - big[1] + small[1])

    def _identity_fits(self) -> bool:
        """Whether the output can equal the input in shape, so that an identity branch exists.

        That needs ``in_channels == out_channels``, stride 1 and size-preserving padding.
        """
        fits = self.in_channels == self.out_channels and self.stride == (1, 1)
        return fits and self.padding == same_padding(self.kernel_size, self.dilation)

    def _identity_bn(self) -> nn.BatchNorm2d | None:
        """BatchNorm on the identity where :meth:`_identity_fits`, else None."""
        return nn.BatchNorm2d(self.in_channels, **self.factory_kwargs) if self._identity_fits() else None

    @property
    def deploy(self) -> bool:
        """True once the block is a single conv (built with ``deploy=True`` or reparameterized)."""
        return self.reparam is not None

    def forward(self, x: Tensor) -> Tensor:
        y = self.reparam(x) if self.reparam is not None else self.forward_branches(x)
        return self.act(self.se(y))

    def forward_branches(self, x: Tensor) -> Tensor:
        """The training form: the sum of the branches."""
        raise NotImplementedError

    def fused_op(self) -> ConvOp:
        """The branches' sum (BN in eval statistics) as one operator, built with trainfer.algebra."""
        raise NotImplementedError

    @torch.no_grad()
    def reparameterize(self) -> ReparamBlock:
        """Replace the branches by one conv ``reparam`` computing their sum in eval mode; in place.

        The training-only branches are deleted (their parameters freed). Idempotent: on a block
        already in deploy form it does nothing. Half-precision blocks are folded in float32 and
        the fused kernel is rounded once, instead of rounding every intermediate product.
        """
        if self.reparam is not None:
            return self
        dtype = next(self.parameters()).dtype
        source = self if dtype in (torch.float32, torch.float64) else copy.deepcopy(self).float()
        self.reparam = algebra.to_conv2d(source.fused_op()).to(dtype)
        for name in self.branch_names:
            delattr(self, name)
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, deploy={self.deploy}"
        )
