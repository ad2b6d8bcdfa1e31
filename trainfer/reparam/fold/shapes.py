"""Shapes for the folder: record every node's output shape and dtype, and read them back.

:func:`propagate_shapes` fills ``node.meta["tensor_meta"]``; :func:`shape` and :func:`numel` read
it (``None`` / 1 for nodes without a tensor value), :func:`macs` and :func:`layer_cost` price a
conv producing a node. Nothing here changes the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from trainfer.reparam.algebra import ConvOp

__all__ = ["layer_cost", "macs", "numel", "propagate_shapes", "shape"]


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Record each node's output shape and dtype as ``node.meta["tensor_meta"]``.

    Fake tensors compute no arithmetic (the training form at full resolution costs milliseconds);
    graphs fake tensors cannot run (data-dependent values) run for real through ``ShapeProp``.
    """
    with torch.no_grad():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                FakeTensorProp(gm, mode).propagate(
                    *(mode.from_tensor(a) if isinstance(a, Tensor) else a for a in inputs)
                )
        except Exception:  # noqa: BLE001 - any op fake tensors do not support: fall back to real execution
            _RealShapes(gm).run(*inputs)
            return
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)


class _RealShapes(fx.Interpreter):
    """``ShapeProp`` without its ``traceback.print_exc()``: runs for real, records ``tensor_meta``, prints nothing."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if any(isinstance(value, Tensor) for value in torch.utils._pytree.tree_leaves(result)):
            n.meta["tensor_meta"] = fx.node.map_aggregate(
                result, lambda value: _extract_tensor_metadata(value) if isinstance(value, Tensor) else value
            )
        return result


def shape(node: Any) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` (None for a non-node or a node without one tensor value)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def numel(node: fx.Node) -> int:
    """Elements of ``node``'s output (1 when it has no recorded shape: a scalar's worth)."""
    return int(torch.Size(shape(node) or ()).numel())


def macs(op: ConvOp, out: fx.Node) -> int:
    """Multiply-adds of ``op`` producing ``out``: ``numel(out) * in_channels/groups * kh * kw``."""
    return numel(out) * op.weight.shape[1] * op.kernel_size[0] * op.kernel_size[1]


def layer_cost(op: ConvOp, out: fx.Node) -> int:
    """What ``op`` costs as one layer producing ``out``: its multiply-adds plus its weight elements
    (each weight is read once per call; see :mod:`~trainfer.reparam.fold.cost`)."""
    return macs(op, out) + op.weight.numel()
