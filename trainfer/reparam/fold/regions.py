"""Region composition: linear expressions ``op(anchor)`` and how one node's step joins its source's.

An :class:`Expr` says that a node's value is ``op(anchor)`` for one upstream node ``anchor`` and a
:class:`~trainfer.reparam.algebra.ConvOp` ``op``, built from ``members`` that cost ``cost``
operations unfused. A *step* maps the source's operator (``None``: the source itself) to the
node's. :meth:`FoldContext.chain` applies a step to the source's expression when the node may
absorb it (the source has this one consumer and was not forced apart by the cost model), and
starts a new region at the source otherwise. A step that is not exact raises
:class:`~trainfer.reparam.algebra.AlgebraError`; the reason is recorded and the region ends there.

Three objects, three owners:

* :class:`FoldGraph` (frozen): the graph being folded and what reads it (its modules, constants,
  names for the log, the handler table). Built once per graph by the driver.
* :class:`RegionState`: the expressions found so far, what they absorbed, reasons recorded; one per
  recognition round (:func:`~trainfer.reparam.fold.recognize.find_regions` makes a fresh one), with
  the nodes the cost model forced apart (:mod:`~trainfer.reparam.fold.cost` owns that set).
* :class:`FoldContext` (frozen): what fold handlers receive. They read through it (``module``,
  ``constant``, ``name``, ``identity``) and build their node's expression with its composition
  methods (``linear``, ``chain``, ``add_branches``), which alone write the round's state. A handler
  that finds its node not linear raises :class:`~trainfer.reparam.fold.linearity.NotLinear`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, fx, nn

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold.constants import Constants
from trainfer.reparam.fold.linearity import NotLinear
from trainfer.reparam.fold.naming import Naming
from trainfer.reparam.fold.shapes import layer_cost, numel, shape

if TYPE_CHECKING:  # the table's type only: handlers import this module
    from trainfer.reparam.fold.handlers import FoldHandlers

__all__ = ["Expr", "FoldContext", "FoldGraph", "RegionState", "Step", "region_op"]

#: ``step(previous, anchor)``: the node's operator given its source's (``None``: the identity on ``anchor``).
Step = Callable[[ConvOp | None, fx.Node], ConvOp]


@dataclass(frozen=True)
class Expr:
    """``op(anchor)`` (``op=None``: the anchor itself), built from ``members`` costing ``cost`` operations;
    ``layer``: a member is a conv or linear layer (:meth:`FoldContext.linear`), not only per-channel maths."""

    anchor: fx.Node
    op: ConvOp | None
    members: tuple[fx.Node, ...] = ()
    cost: int = 0
    layer: bool = False


def _sum(ops: list[ConvOp], names: list[str]) -> ConvOp:
    """``algebra.add`` of the branches, or of their undilated kernels where only that adds them up."""
    try:
        return algebra.add(ops, names)
    except AlgebraError:
        if len({op.dilation for op in ops}) == 1:
            raise
        return algebra.add([algebra.undilated(op) for op in ops], names)


def region_op(expr: Expr) -> ConvOp:
    """The ``op`` of an expression recorded in :attr:`RegionState.exprs` (only placeholders have none)."""
    return cast(ConvOp, expr.op)  # recorded expressions come from chain/add_branches, which always build an op


@dataclass(frozen=True)
class FoldGraph:
    """One graph's fold, read-only: the graph module, its modules, constants, log names and handler table."""

    gm: fx.GraphModule
    modules: Mapping[str, nn.Module]
    constants: Constants
    naming: Naming
    handlers: FoldHandlers

    @classmethod
    def of(cls, gm: fx.GraphModule, prefix: str, handlers: FoldHandlers) -> FoldGraph:
        """``gm`` (traced from the module at path ``prefix`` of the whole model) read with ``handlers``."""
        constants = Constants(gm)
        return cls(gm, MappingProxyType(dict(gm.named_modules())), constants, Naming(prefix, constants), handlers)


@dataclass
class RegionState:
    """One recognition round: each node's expression, the nodes absorbed into a consumer's region, reasons."""

    forced: frozenset[fx.Node] = frozenset()  # materialised: a region through them would cost more
    exprs: dict[fx.Node, Expr] = field(default_factory=dict)
    absorbed: set[fx.Node] = field(default_factory=set)
    kept: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FoldContext:
    """What a fold handler receives: the graph to read, and the composition that records its node's expression."""

    graph: FoldGraph
    _state: RegionState  # the round's state: written by the composition methods below, never by handlers

    # -- what handlers read ---------------------------------------------------------------------

    @property
    def constants(self) -> Constants:
        """The graph's constant values (:class:`~trainfer.reparam.fold.constants.Constants`)."""
        return self.graph.constants

    def module(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.graph.modules[cast(str, node.target)]

    def constant(self, value: Any) -> Tensor | None:
        """The constant tensor ``value`` is (a parameter, a buffer, maths on them), or None."""
        return self.graph.constants.tensor(value)

    def name(self, node: Any) -> str:
        """``node``'s name in the log (its module or parameter path in the whole model)."""
        return self.graph.naming.name(node)

    def identity(self, anchor: fx.Node) -> ConvOp:
        """The identity on ``anchor``'s channels as a depthwise 1x1 conv."""
        meta = anchor.meta["tensor_meta"]
        channels = meta.shape[1]
        return algebra.identity(channels, 1, groups=channels, dtype=meta.dtype, device=self.graph.constants.device)

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

    def linear(self, node: fx.Node, source: Any, op: ConvOp) -> Expr:
        """``node = op(source)``, costing ``op``'s multiply-adds and weights: a conv or linear layer."""
        return replace(self.chain(node, source, self.then(op), layer_cost(op, node)), layer=True)

    def chain(
        self, node: fx.Node, source: Any, step: Step, cost: int | None = None, via: Sequence[fx.Node] = ()
    ) -> Expr:
        """``node``'s expression from its one input ``source`` and its ``step``; ``cost`` defaults to
        one operation per output element. ``via``: nodes between ``source`` and ``node`` that the
        step accounts for (each with one user, the next; a pad whose border later item assignments
        overwrite). Raises :class:`NotLinear` when ``source`` is not a tensor node or the step fails."""
        if not isinstance(source, fx.Node) or shape(source) is None:
            raise NotLinear()
        own_cost = numel(node) if cost is None else cost
        expr, absorbable = self.source_expr(source, node, via)
        if absorbable:
            try:
                op = step(expr.op, expr.anchor)
                joined = Expr(expr.anchor, op, expr.members + (node,), expr.cost + own_cost, expr.layer)
                return self._accept([source], joined)
            except AlgebraError as error:
                self._state.kept.append(f"{self.name(node)} kept apart from {self.name(source)}: {error}")
        try:
            op = step(None, source)
        except AlgebraError as error:
            raise NotLinear(str(error)) from error
        return Expr(source, op, (node,), own_cost)

    def add_branches(self, node: fx.Node, left: fx.Node, right: fx.Node, sign: float) -> Expr:
        """``node = left + sign * right`` where both are linear in one anchor."""
        if left is right:
            (a, a_ok), (b, b_ok) = (Expr(left, None), False), (Expr(left, None), False)
        else:
            (a, a_ok), (b, b_ok) = self.source_expr(left, node), self.source_expr(right, node)
        if a.anchor is not b.anchor:
            raise NotLinear()
        try:
            ops = [a.op or self.identity(a.anchor), algebra.scale(b.op or self.identity(b.anchor), sign)]
            op = _sum(ops, [self.name(left), self.name(right)])
        except AlgebraError as error:
            raise NotLinear(f"branches not merged: {error}") from error
        members, cost = a.members + b.members + (node,), a.cost + b.cost + numel(node)
        expr = Expr(a.anchor, op, members, cost, a.layer or b.layer)
        return self._accept([s for s, ok in ((left, a_ok), (right, b_ok)) if ok], expr)

    def source_expr(self, source: fx.Node, consumer: fx.Node, via: Sequence[fx.Node] = ()) -> tuple[Expr, bool]:
        """The source's expression if the consumer may absorb it (the path ``source, *via, consumer``
        has one user at each step), else the source itself."""
        expr = self._state.exprs.get(source)
        path = (source, *via, consumer)
        single = all(len(a.users) == 1 and b in a.users for a, b in zip(path, path[1:]))
        if expr is not None and single and source not in self._state.forced:
            return expr, True
        return Expr(source, None), False

    def _accept(self, sources: list[fx.Node], expr: Expr) -> Expr:
        self._state.absorbed.update(sources)
        return expr
