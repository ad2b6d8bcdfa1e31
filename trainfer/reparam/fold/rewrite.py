"""Rewriting: each region becomes one module in the graph, named after the modules it replaces.

:func:`rewrite_region` inserts ``<common module path>.fused`` (an ``nn.Conv2d`` for 4-D values, an
``nn.Linear`` for 2-D ones) reading the region's anchor and makes the region's users read it; the
old nodes become dead code. A region that is only a per-channel affine (BatchNorms, layer scales,
a channels-first LayerNorm's ``weight[:, None, None] * x + bias[:, None, None]``) becomes a
:class:`ChannelAffine`, one elementwise ``addcmul``: a depthwise 1x1 conv computes the same with
fewer multiply-adds on paper, and CPU PyTorch runs it through a slow path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch
from torch import Tensor, fx, nn

from trainfer.reparam import algebra
from trainfer.reparam.fold.log import FoldedRegion, FoldLog, describe
from trainfer.reparam.fold.regions import Expr, FoldGraph, region_op
from trainfer.reparam.fold.shapes import shape

__all__ = ["ChannelAffine", "rewrite_region"]


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


def _is_channel_affine(expr: Expr) -> bool:
    """The region only scales and shifts each channel on its own (a depthwise 1x1 conv without stride
    or padding) and none of its members is a conv or linear layer (those stay layers)."""
    op = region_op(expr)
    return (
        not expr.layer
        and op.kernel_size == (1, 1)
        and op.groups == op.in_channels == op.out_channels
        and op.stride == (1, 1)
        and op.padding == (0, 0)
    )


def rewrite_region(graph: FoldGraph, root: fx.Node, expr: Expr, anchor: fx.Node, log: FoldLog) -> fx.Node:
    """Replace the region ending at ``root`` by one conv/linear module reading ``anchor``; log it."""
    rank = len(shape(root) or ())
    if _is_channel_affine(expr):
        op = region_op(expr)
        module: nn.Module = ChannelAffine(op.weight.flatten(), op.bias, rank)
    elif rank == 4:
        module = algebra.to_conv2d(region_op(expr))
    else:
        dense = algebra.regroup(region_op(expr), 1)
        module = algebra.to_linear(dense.weight[:, :, 0, 0], dense.bias)
    gm, prefix = graph.gm, graph.naming.prefix
    name = _new_name(graph, expr.members)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(root):
        new = gm.graph.call_module(name, (anchor,))
    new.meta = dict(root.meta)
    root.replace_all_uses_with(new)
    members = [graph.naming.name(m) for m in expr.members]
    feeds = [f"{prefix}{user.target}" for user in new.users if user.op == "call_module"]
    log.regions.append(FoldedRegion(prefix + name, members, describe(module), feeds))
    return new


def _new_name(graph: FoldGraph, members: Sequence[fx.Node]) -> str:
    """``<common module path of the members>.fused`` (``_1``, ``_2``... when taken)."""
    origins = [graph.naming.origin(m) for m in members]
    paths = [origin.split(".")[:-1] for origin in origins if origin]
    common: list[str] = []
    for parts in zip(*paths) if paths else ():
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    executed = {node.target for node in graph.gm.graph.nodes if node.op == "call_module"}
    while common and ".".join(common) in executed:
        common.pop()  # never add a child to a layer that runs
    base = ".".join([*common, "fused"])
    name, index = base, 0
    while _has_attribute(graph.gm, name):  # finite: the module has finitely many attributes
        index += 1
        name = f"{base}_{index}"
    return name


def _has_attribute(module: nn.Module, dotted: str) -> bool:
    try:
        reduce(getattr, dotted.split("."), module)
    except AttributeError:
        return False
    return True
