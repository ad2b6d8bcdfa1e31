"""Node recognition over a graph: each node's linear expression, and the regions they form.

:func:`expression` asks the handler table (:class:`~trainfer.reparam.fold.handlers.FoldHandlers`)
for a node; :func:`find_regions` walks the graph in order, so a node's sources are known before it
is, with a fresh :class:`~trainfer.reparam.fold.regions.RegionState` each time it runs.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

from torch import fx

from trainfer.errors import InputTypeError
from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.linearity import NotLinear
from trainfer.reparam.fold.regions import Expr, FoldContext, FoldGraph, RegionState
from trainfer.reparam.fold.shapes import shape

__all__ = ["Regions", "expression", "find_regions"]

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y``, ...: the node's first argument is overwritten."""
    if node.op == "call_method":
        return target_name(node).endswith("_")
    return node.op == "call_function" and node.target in _INPLACE_OPERATORS


def expression(context: FoldContext, node: fx.Node) -> Expr:
    """``node``'s linear expression; raises :class:`NotLinear` where there is none: only floating 2-D
    and 4-D values are linear here, and an in-place op only where nobody else reads the tensor it overwrites."""
    shape_ = shape(node)
    if shape_ is None or len(shape_) not in (2, 4) or not node.meta["tensor_meta"].dtype.is_floating_point:
        raise NotLinear()
    if _is_inplace(node) and isinstance(node.args[0], fx.Node) and len(node.args[0].users) > 1:
        raise NotLinear()
    handler = context.graph.handlers.handler_for(node, context.graph.modules)
    if handler is None:
        raise NotLinear()
    expr = handler(context, node)
    if not isinstance(expr, Expr):
        raise InputTypeError(
            f"the fold handler {getattr(handler, '__qualname__', handler)!r} returned {type(expr).__name__} for "
            f"{context.name(node)}: a handler returns an Expr, or raises NotLinear where the node is not linear"
        )
    return expr


@dataclass(frozen=True)
class Regions:
    """One recognition round: the roots of regions with two or more ops (graph order), every node's
    expression, and the reasons recorded for nodes that stayed apart."""

    roots: list[tuple[fx.Node, Expr]]
    exprs: Mapping[fx.Node, Expr]
    kept: tuple[str, ...]


def find_regions(graph: FoldGraph, forced: frozenset[fx.Node] = frozenset()) -> Regions:
    """Every node's expression, built afresh with ``forced`` nodes kept apart; the regions they form."""
    state = RegionState(forced=forced)
    context = FoldContext(graph, state)
    for node in list(graph.gm.graph.nodes):
        try:
            state.exprs[node] = expression(context, node)
        except NotLinear as not_linear:
            if not_linear.reason:
                state.kept.append(f"{context.name(node)}: {not_linear.reason}")
    roots = [(n, e) for n, e in state.exprs.items() if n not in state.absorbed and len(e.members) > 1]
    return Regions(roots, state.exprs, tuple(state.kept))
