"""Graph rewrites the folder runs before it looks for linear regions (each exact, each one pass).

* :func:`resolve_rank_checks`: ``torch._assert(x.ndim == 4, ...)`` (timm's ``BatchNormAct2d`` and
  others) reads the conv output a second time, which stops the conv from absorbing the batch norm
  after it. A value's rank is fixed by the traced graph, so rank queries become constants, and
  assertions that then hold statically are dropped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

__all__ = ["resolve_rank_checks"]

_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_}
_ASSERTS = {torch._assert}


def _rank_query(node: fx.Node) -> fx.Node | None:
    """The tensor whose rank ``node`` asks for (``x.ndim``, ``x.dim()``, ``x.ndimension()``), else None."""
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",):
        return node.args[0]
    if node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1:
        return node.args[0]
    return None


def _static_value(node: fx.Node) -> tuple[bool, Any]:
    """``(True, value)`` for a rank query or a comparison of static values, ``(False, None)`` otherwise."""
    source = _rank_query(node)
    if isinstance(source, fx.Node):
        meta = source.meta.get("tensor_meta")
        return (True, len(meta.shape)) if meta is not None and hasattr(meta, "shape") else (False, None)
    if node.op == "call_function" and node.target in _COMPARISONS and not node.all_input_nodes:
        return True, node.target(*node.args)
    return False, None


def _replace_with_constant(node: fx.Node, value: Any) -> None:
    """Every use of ``node`` reads the constant ``value`` instead."""

    def swap(argument: fx.Node) -> Any:
        return value if argument is node else argument

    for user in list(node.users):
        user.args, user.kwargs = fx.node.map_arg(user.args, swap), fx.node.map_arg(user.kwargs, swap)


def resolve_rank_checks(graph: fx.Graph) -> int:
    """Replace rank queries (and comparisons of them) by constants; drop asserts that hold. Returns how many.

    Needs ``tensor_meta`` (shape propagation). One pass in graph order suffices: a comparison's
    arguments come before it and are already constants when it is reached.
    """
    resolved = 0
    for node in list(graph.nodes):
        static, value = _static_value(node)
        if static:
            _replace_with_constant(node, value)
            graph.erase_node(node)
            resolved += 1
        elif node.op == "call_function" and node.target in _ASSERTS and node.args and node.args[0] is True:
            graph.erase_node(node)
            resolved += 1
    return resolved
