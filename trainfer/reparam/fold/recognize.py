"""Node recognition over a graph: each node's linear expression, and the regions they form.

:func:`expression` asks the handler table (:mod:`~trainfer.reparam.fold.handlers`) for a node;
:func:`find_regions` walks the graph in order, so a node's sources are known before it is.
"""

from __future__ import annotations

import operator

from torch import fx

from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.constants import NotConstant
from trainfer.reparam.fold.handlers import handler_for
from trainfer.reparam.fold.regions import Expr, FoldContext
from trainfer.reparam.fold.shapes import shape

__all__ = ["expression", "find_regions"]

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y``, ...: the node's first argument is overwritten."""
    if node.op == "call_method":
        return target_name(node).endswith("_")
    return node.op == "call_function" and node.target in _INPLACE_OPERATORS


def expression(context: FoldContext, node: fx.Node) -> Expr | None:
    """``node``'s linear expression, or None: only floating 2-D and 4-D values are linear here, and an
    in-place op only where nobody else reads the tensor it overwrites."""
    shape_ = shape(node)
    if shape_ is None or len(shape_) not in (2, 4) or not node.meta["tensor_meta"].dtype.is_floating_point:
        return None
    if _is_inplace(node) and isinstance(node.args[0], fx.Node) and len(node.args[0].users) > 1:
        return None
    handler = handler_for(node, context.modules)
    try:
        return handler(context, node) if handler is not None else None
    except NotConstant:
        return None


def find_regions(context: FoldContext) -> list[tuple[fx.Node, Expr]]:
    """Build every node's expression afresh; return the roots of regions with two or more ops, in graph order."""
    context.exprs, context.absorbed, context.kept = {}, set(), []
    for node in list(context.gm.graph.nodes):
        expr = expression(context, node)
        if expr is not None:
            context.exprs[node] = expr
    return [(n, e) for n, e in context.exprs.items() if n not in context.absorbed and len(e.members) > 1]
