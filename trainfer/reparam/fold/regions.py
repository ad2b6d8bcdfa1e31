"""Region composition: linear expressions ``op(anchor)`` and how one node's step joins its source's.

An :class:`Expr` says that a node's value is ``op(anchor)`` for one upstream node ``anchor`` and a
:class:`~trainfer.reparam.algebra.ConvOp` ``op``, built from ``members`` that cost ``cost``
operations unfused. A *step* maps the source's operator (``None``: the source itself) to the
node's. :meth:`FoldContext.chain` applies a step to the source's expression when the node may
absorb it (the source has this one consumer and was not forced apart by the cost model), and
starts a new region at the source otherwise. A step that is not exact raises
:class:`~trainfer.reparam.algebra.AlgebraError`; the reason is recorded and the region ends there.

:class:`FoldContext` is what fold handlers (:func:`trainfer.reparam.fold.register_fold_handler`)
receive: the graph's modules, its constants, names for the log, and the composition methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

from torch import Tensor, fx, nn

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold.constants import Constants
from trainfer.reparam.fold.naming import Naming
from trainfer.reparam.fold.shapes import layer_cost, numel, shape

__all__ = ["Expr", "FoldContext", "Step", "region_op", "undilated"]

#: ``step(previous, anchor)``: the node's operator given its source's (``None``: the identity on ``anchor``).
Step = Callable[[ConvOp | None, fx.Node], ConvOp]


@dataclass(frozen=True)
class Expr:
    """``op(anchor)`` (``op=None``: the anchor itself), built from ``members`` costing ``cost`` operations."""

    anchor: fx.Node
    op: ConvOp | None
    members: tuple[fx.Node, ...] = ()
    cost: int = 0


def _sum(ops: list[ConvOp], names: list[str]) -> ConvOp:
    """``algebra.add`` of the branches, or of their :func:`undilated` kernels where only that adds them up."""
    try:
        return algebra.add(ops, names)
    except AlgebraError:
        if len({op.dilation for op in ops}) == 1:
            raise
        return algebra.add([undilated(op) for op in ops], names)


def undilated(op: ConvOp) -> ConvOp:
    """``op`` with dilation 1: a ``k``-tap kernel dilated by ``d`` is a ``(k - 1) * d + 1``-tap kernel
    with ``d - 1`` zeros between its taps, reading the same window (same padding and offset), so
    branches of different dilations (UniRepLKNet's dilated reparam block) add up exactly."""
    if op.dilation == (1, 1):
        return op
    (dh, dw), (kh, kw) = op.dilation, op.kernel_size
    weight = op.weight.new_zeros(*op.weight.shape[:2], (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    weight[:, :, ::dh, ::dw] = op.weight
    return replace(op, weight=weight, dilation=(1, 1))


def region_op(expr: Expr) -> ConvOp:
    """The ``op`` of an expression recorded in :attr:`FoldContext.exprs` (only placeholders have none)."""
    return cast(ConvOp, expr.op)  # recorded expressions come from chain/add_branches, which always build an op


class FoldContext:
    """The state of one graph's fold: expressions found so far, the cost model's forced nodes, reasons kept."""

    def __init__(self, gm: fx.GraphModule, prefix: str) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.constants = Constants(gm)
        self.naming = Naming(prefix, self.constants)
        self.exprs: dict[fx.Node, Expr] = {}
        self.absorbed: set[fx.Node] = set()
        self.forced: set[fx.Node] = set()  # materialised because a region through them would cost more MACs
        self.kept: list[str] = []

    # -- what handlers read ---------------------------------------------------------------------

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[node.target]

    def constant(self, value: Any) -> Tensor | None:
        """The constant tensor ``value`` is (a parameter, a buffer, maths on them), or None."""
        return self.constants.tensor(value)

    def name(self, node: Any) -> str:
        """``node``'s name in the log (its module or parameter path in the whole model)."""
        return self.naming.name(node)

    def keep(self, node: fx.Node, reason: str) -> None:
        """Record why ``node`` stays as it is."""
        self.kept.append(f"{self.name(node)}: {reason}")

    def identity(self, anchor: fx.Node) -> ConvOp:
        """The identity on ``anchor``'s channels as a depthwise 1x1 conv."""
        meta = anchor.meta["tensor_meta"]
        channels = meta.shape[1]
        return algebra.identity(channels, 1, groups=channels, dtype=meta.dtype, device=self.constants.device)

    # -- steps and composition ------------------------------------------------------------------

    @staticmethod
    def then(op: ConvOp) -> Step:
        """The step of a node computing ``op`` of its source."""
        return lambda previous, anchor: op if previous is None else algebra.sequential(previous, op)

    def affine(self, scale: Tensor, shift: Tensor | None) -> Step:
        """The step of a per-channel (or scalar) ``scale * x + shift``."""

        def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
            return algebra.channel_affine(previous or self.identity(anchor), scale, shift)

        return step

    def linear(self, node: fx.Node, source: Any, op: ConvOp) -> Expr | None:
        """``node = op(source)``, costing ``op``'s multiply-adds and weights: a conv or linear layer."""
        return self.chain(node, source, self.then(op), layer_cost(op, node))

    def chain(self, node: fx.Node, source: Any, step: Step, cost: int | None = None) -> Expr | None:
        """``node``'s expression from its one input ``source`` and its ``step``; ``cost`` defaults to
        one operation per output element. None when ``source`` is not a tensor node or the step fails."""
        if not isinstance(source, fx.Node) or shape(source) is None:
            return None
        own_cost = numel(node) if cost is None else cost
        expr, absorbable = self.source_expr(source, node)
        if absorbable:
            try:
                op = step(expr.op, expr.anchor)
                return self._accept([source], Expr(expr.anchor, op, expr.members + (node,), expr.cost + own_cost))
            except AlgebraError as error:
                self.kept.append(f"{self.name(node)} kept apart from {self.name(source)}: {error}")
        try:
            op = step(None, source)
        except AlgebraError as error:
            self.keep(node, str(error))
            return None
        return Expr(source, op, (node,), own_cost)

    def add_branches(self, node: fx.Node, left: fx.Node, right: fx.Node, sign: float) -> Expr | None:
        """``node = left + sign * right`` where both are linear in one anchor."""
        if left is right:
            (a, a_ok), (b, b_ok) = (Expr(left, None), False), (Expr(left, None), False)
        else:
            (a, a_ok), (b, b_ok) = self.source_expr(left, node), self.source_expr(right, node)
        if a.anchor is not b.anchor:
            return None
        try:
            ops = [a.op or self.identity(a.anchor), algebra.scale(b.op or self.identity(b.anchor), sign)]
            op = _sum(ops, [self.name(left), self.name(right)])
            expr = Expr(a.anchor, op, a.members + b.members + (node,), a.cost + b.cost + numel(node))
            return self._accept([s for s, ok in ((left, a_ok), (right, b_ok)) if ok], expr)
        except AlgebraError as error:
            self.keep(node, f"branches not merged: {error}")
            return None

    def source_expr(self, source: fx.Node, consumer: fx.Node) -> tuple[Expr, bool]:
        """The source's expression if the consumer may absorb it (its only user), else the source itself."""
        expr = self.exprs.get(source)
        if expr is not None and len(source.users) == 1 and consumer in source.users and source not in self.forced:
            return expr, True
        return Expr(source, None), False

    def _accept(self, sources: list[fx.Node], expr: Expr) -> Expr:
        self.absorbed.update(sources)
        return expr
