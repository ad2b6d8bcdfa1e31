"""The cost model: a region becomes one conv only where that costs no more than its ops did.

A region's cost is, for each conv and linear, its multiply-adds plus its weight elements (each
weight is read once per call: a ``1x1 conv -> AvgPool2d(2, 2)`` merged into a 2x2 stride-2 conv has
the same multiply-adds and 4x the weights, and runs slower where the channels outnumber a third of
the output pixels, e.g. DenseNet's 512- and 1024-channel transitions), plus one operation per
output element of everything else (``kh * kw`` for an average pool). Where one conv would cost more
(:func:`~trainfer.reparam.fold.shapes.layer_cost`), :func:`settle_costs` forces nodes apart until no region does.
"""

from __future__ import annotations

from torch import fx

from trainfer.reparam.fold.recognize import Regions, find_regions
from trainfer.reparam.fold.regions import Expr, FoldGraph, region_op
from trainfer.reparam.fold.shapes import layer_cost

__all__ = ["settle_costs"]


def _costly(regions: Regions) -> list[tuple[fx.Node, Expr]]:
    return [(root, expr) for root, expr in regions.roots if layer_cost(region_op(expr), root) > expr.cost]


def settle_costs(graph: FoldGraph, splits: list[str]) -> Regions:
    """The regions of ``graph``, split until none costs more as one conv than its ops.

    Each split is recorded in ``splits``. Finite: each round forces at least one node that was not
    forced before (see :func:`_split_point`), and the forced nodes are graph nodes, so there are at
    most ``len(graph.nodes)`` rounds.
    """
    forced: set[fx.Node] = set()
    regions = find_regions(graph)
    while costly := _costly(regions):
        before = len(forced)
        for root, expr in costly:
            forced.update(_split_point(regions, expr))
            splits.append(
                f"{graph.naming.name(root)}: one conv would cost {layer_cost(region_op(expr), root)} operations "
                f"(multiply-adds and weights) instead of {expr.cost}; folded in parts"
            )
        if len(forced) == before:  # cannot happen (see _split_point); never loop on it
            raise AssertionError(f"cost split made no progress on {[graph.naming.name(r) for r, _ in costly]}")
        regions = find_regions(graph, frozenset(forced))
    return regions


def _split_point(regions: Regions, expr: Expr) -> set[fx.Node]:
    """The nodes to materialise so that the costly region ``expr`` breaks at its first costly member.

    ``split`` is the first member whose own region costs more as one conv than its ops. Its
    inputs inside that region are forced; they were absorbed, hence not forced yet. If it has
    none, ``split`` is the first op of its chain (an average pool on the anchor, say): it is
    forced itself, and it was not forced yet either, since the region's consumer absorbed it.
    """
    exprs = regions.exprs
    split = next(m for m in expr.members if layer_cost(region_op(exprs[m]), m) > exprs[m].cost)
    inputs = {node for node in split.all_input_nodes if node in exprs[split].members}
    return inputs or {split}
