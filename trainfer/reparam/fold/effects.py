"""Graph nodes that act by changing a value in place: dead-code elimination must keep them.

``torch.fx`` treats every ``call_method`` node as pure, so ``Graph.eliminate_dead_code`` drops one
whose result is unused. A method called for its effect has an unused result: torchvision's FPN
``LastLevelMaxPool`` runs ``names.append("pool"); x.append(F.max_pool2d(x[-1], 1, 2, 0))`` on the
lists it is given and returns them, so a graph traced from it alone (folded on its own because its
parent cannot be traced) would lose the extra level. :func:`is_impure` keeps such nodes.
"""

from __future__ import annotations

import operator

from torch import fx

__all__ = ["eliminate_dead_code", "is_impure"]

#: Methods of Python containers that change the container they are called on.
MUTATING_METHODS = frozenset(
    {
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "clear",
        "sort",
        "reverse",  # list
        "update",
        "setdefault",
        "popitem",
        "add",
        "discard",  # dict, set
        "__setitem__",
        "__delitem__",
        "__iadd__",
    }
)
_MUTATING_FUNCTIONS = frozenset({operator.setitem, operator.delitem, operator.iadd})


def is_impure(node: fx.Node) -> bool:
    """``node`` must stay even when nothing reads its result: fx's own rule (placeholders, outputs,
    side-effectful functions), a container-mutating method, ``operator.setitem`` & co, or an in-place
    tensor method (``x.add_(y)``: the name ends with one underscore)."""
    if node.is_impure():
        return True
    if node.op == "call_method" and isinstance(node.target, str):
        in_place = node.target.endswith("_") and not node.target.endswith("__")
        return in_place or node.target in MUTATING_METHODS
    return node.op == "call_function" and node.target in _MUTATING_FUNCTIONS


def eliminate_dead_code(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code``, keeping the nodes :func:`is_impure` names."""
    graph.eliminate_dead_code(is_impure_node=is_impure)
