"""Rewriting: each region becomes one module in the graph, named after the modules it replaces.

:func:`rewrite_region` inserts ``<common module path>.fused`` (an ``nn.Conv2d`` for 4-D values, an
``nn.Linear`` for 2-D ones) reading the region's anchor and makes the region's users read it; the
old nodes become dead code. A region that is only a per-channel affine (BatchNorms, layer scales,
a channels-first LayerNorm's ``weight[:, None, None] * x + bias[:, None, None]``) becomes a
:class:`ChannelAffine`, one elementwise ``addcmul``: a depthwise 1x1 conv computes the same with
fewer multiply-adds on paper, and CPU PyTorch runs it through a slow path.
:func:`fuse_sequential_pairs` is the same rewrite without a graph, for an ``nn.Sequential`` whose
own ``forward`` could not be traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import cast

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold.log import FoldedRegion, FoldLog, describe
from trainfer.reparam.fold.regions import Expr, FoldContext, region_op
from trainfer.reparam.fold.shapes import shape
from trainfer.reparam.fold.trace import is_leaf

__all__ = ["ChannelAffine", "fuse_sequential_pairs", "rewrite_region"]


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (dim 1), one ``torch.addcmul`` kernel."""

    scale: Tensor
    shift: Tensor

    def __init__(self, scale: Tensor, shift: Tensor, rank: int) -> None:
        super().__init__()
        trailing = (1,) * (rank - 2)
        self.register_buffer("scale", scale.reshape(-1, *trailing).clone())
        self.register_buffer("shift", shift.reshape(-1, *trailing).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, self.scale)


_LAYER_FUNCTIONS = {nn.functional.conv2d, nn.functional.linear, torch.conv2d}


def _is_channel_affine(context: FoldContext, expr: Expr) -> bool:
    """The region only scales and shifts each channel on its own (a depthwise 1x1 conv without stride
    or padding) and none of its members is a conv or linear layer (those stay layers)."""
    op = region_op(expr)
    layers = [
        m
        for m in expr.members
        if m.op == "call_module"
        and isinstance(context.modules.get(str(m.target)), (nn.Conv2d, nn.Linear))
        or m.op == "call_function"
        and m.target in _LAYER_FUNCTIONS
    ]
    return (
        not layers
        and op.kernel_size == (1, 1)
        and op.groups == op.in_channels == op.out_channels
        and op.stride == (1, 1)
        and op.padding == (0, 0)
    )


def rewrite_region(context: FoldContext, root: fx.Node, expr: Expr, anchor: fx.Node, log: FoldLog) -> fx.Node:
    """Replace the region ending at ``root`` by one conv/linear module reading ``anchor``; log it."""
    rank = len(shape(root) or ())
    if _is_channel_affine(context, expr):
        op = region_op(expr)
        module: nn.Module = ChannelAffine(op.weight.flatten(), op.bias, rank)
    elif rank == 4:
        module = algebra.to_conv2d(region_op(expr))
    else:
        dense = algebra.regroup(region_op(expr), 1)
        module = algebra.to_linear(dense.weight[:, :, 0, 0], dense.bias)
    gm, prefix = context.gm, context.naming.prefix
    name = _new_name(context, expr.members)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(root):
        new = gm.graph.call_module(name, (anchor,))
    new.meta = dict(root.meta)
    root.replace_all_uses_with(new)
    members = [context.name(m) for m in expr.members]
    feeds = [f"{prefix}{user.target}" for user in new.users if user.op == "call_module"]
    log.regions.append(FoldedRegion(prefix + name, members, describe(module), feeds))
    return new


def _new_name(context: FoldContext, members: Sequence[fx.Node]) -> str:
    """``<common module path of the members>.fused`` (``_1``, ``_2``... when taken)."""
    origins = [context.naming.origin(m) for m in members]
    paths = [origin.split(".")[:-1] for origin in origins if origin]
    common: list[str] = []
    for parts in zip(*paths) if paths else ():
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    executed = {node.target for node in context.gm.graph.nodes if node.op == "call_module"}
    while common and ".".join(common) in executed:
        common.pop()  # never add a child to a layer that runs
    base = ".".join([*common, "fused"])
    name, index = base, 0
    while _has_attribute(context.gm, name):  # finite: the module has finitely many attributes
        index += 1
        name = f"{base}_{index}"
    return name


def _has_attribute(module: nn.Module, dotted: str) -> bool:
    try:
        reduce(getattr, dotted.split("."), module)
    except AttributeError:
        return False
    return True


def _fused_pair(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> nn.Module:
    """``layer`` (``nn.Conv2d`` or ``nn.Linear``) followed by ``bn`` as one layer; raises :class:`AlgebraError`."""
    if isinstance(layer, nn.Conv2d):
        return algebra.to_conv2d(algebra.fuse_bn(ConvOp.from_module(layer), bn))
    bias = layer.bias.detach() if layer.bias is not None else None
    return algebra.to_linear(*algebra.fuse_linear_bn(layer.weight.detach(), bias, bn))


def fuse_sequential_pairs(sequence: nn.Sequential, prefix: str, log: FoldLog) -> None:
    """Fold each ``nn.Conv2d``/``nn.Linear`` directly followed by a BatchNorm in ``sequence`` into it."""
    names = list(sequence._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = sequence._modules[first], sequence._modules[second]
        if type(layer) not in (nn.Conv2d, nn.Linear) or not isinstance(bn, _BatchNorm) or not is_leaf(bn):
            continue
        try:
            fused = _fused_pair(cast(nn.Conv2d | nn.Linear, layer), bn)  # its exact type was checked above
        except AlgebraError as error:
            log.kept.append(f"{prefix}{first} -> {prefix}{second}: {error}")
            continue
        sequence._modules[first], sequence._modules[second] = fused, nn.Identity()
        log.regions.append(FoldedRegion(f"{prefix}{first}", [f"{prefix}{first}", f"{prefix}{second}"], describe(fused)))
