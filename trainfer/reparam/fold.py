"""The automatic folder: rewrite every maximal linear region of a model as one convolution.

The pass works on a ``torch.fx`` trace of the model in eval mode, so ``if self.training``
branches, ``forward_infer`` and ``train_only`` modules have already resolved to the inference path.

A node is *linear* when its output is an affine function ``op(anchor)`` of one upstream tensor,
its *anchor*, with ``op`` a :class:`trainfer.reparam.algebra.ConvOp`. Linear nodes are convolutions and
linears with constant weights (modules or ``F.conv2d``/``F.linear`` on parameters), BatchNorm in
eval mode (any ``_BatchNorm`` subclass, or ``F.batch_norm``), sums and differences of branches of
the same anchor (``+``, ``torch.add``, ``sum([...])``), multiplication by a constant scalar or
per-channel tensor (layer scale), zero padding and average pooling. Their operators compose
through the algebra: ``sequential`` for a chain, ``add`` for branches, ``channel_affine`` for
BatchNorm and scales. A chain stops (its last node becomes a *region root*) where the value feeds
a non-linear node, has several consumers, or where the algebra says a further step is not exact
(it raises :class:`~trainfer.reparam.algebra.AlgebraError`) or would cost more multiply-adds than the
unfused ops. Every root whose region holds two or more ops becomes one ``nn.Conv2d`` (4-D values)
or ``nn.Linear`` (2-D values) reading the anchor; dead nodes, and the modules and parameters only
they used, disappear.

A BatchNorm left alone between two non-linearities stays a BatchNorm: in eval mode it is one
per-channel affine kernel, cheaper than the depthwise 1x1 convolution it could become.

When a submodule's ``forward`` cannot be traced (item assignment, data-dependent control flow),
it stays one opaque op of its parent's graph (:mod:`trainfer.fold_trace`), which is folded around
it; the opaque module is listed under "not folded" and its own insides are folded separately.
When a module's own ``forward`` cannot be traced, :func:`fold` folds each of its children
separately, fuses Conv->BatchNorm pairs that are adjacent in an ``nn.Sequential``, and records the
fallback. The module-level protocols models carry (``reparameterize()``,
``switch_to_deploy()``, ``fuse()``) run before, in :mod:`trainfer.protocols`.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold_passes import move_batch_norms_into_heads, resolve_rank_checks
from trainfer.reparam.fold_trace import Untraceable, is_leaf, trace, trace_around_untraceable

__all__ = ["FoldLog", "FoldedRegion", "fold", "trace"]


@dataclass
class FoldedRegion:
    """One linear region rewritten as one module: ``members`` (original ops) -> ``name``.

    ``feeds`` names the modules that read the new module's output (for divergence reports).
    """

    name: str
    members: list[str]
    module: str
    feeds: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} = {self.module}  <-  {', '.join(self.members)}"


@dataclass
class FoldLog:
    """What :func:`fold` did: regions folded, ops kept and why, eval no-ops dropped, fallbacks."""

    regions: list[FoldedRegion] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)


# --- entry point and fallback ---------------------------------------------------------------------


def fold(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[nn.Module, FoldLog]:
    """Fold ``model`` (in eval mode; modified and reused) into its inference form.

    ``example_inputs`` (a tuple of positional arguments) drive shape propagation. Returns the
    folded module, normally an ``fx.GraphModule``, and the log of what happened.
    """
    log = FoldLog()
    return _fold_module(model, tuple(example_inputs), "", log), log


def _fold_module(module: nn.Module, inputs: tuple[Any, ...], prefix: str, log: FoldLog) -> nn.Module:
    """Fold ``module`` as one graph, its untraceable submodules kept as opaque leaves (their insides
    folded separately); if its own ``forward`` cannot be traced, fold its children separately."""
    try:
        gm, opaque = trace_around_untraceable(module, _unsupplied_defaults(module, inputs))
    except Untraceable as untraceable:
        where = prefix.rstrip(".") or "model"
        log.fallbacks.append(f"{where}: not traceable ({_reason(untraceable.error)}); folded its children separately")
        return _fold_children(module, inputs, prefix, log)
    _fold_opaque(gm, opaque, inputs, prefix, log)
    return _GraphFolder(gm, prefix, log).run(inputs)


def _fold_opaque(
    gm: fx.GraphModule, opaque: dict[str, Exception], inputs: tuple[Any, ...], prefix: str, log: FoldLog
) -> None:
    """Record each opaque module under "not folded" with its reason, and fold its insides on their own."""
    if not opaque:
        return
    with _recorded_inputs(gm, list(opaque)) as recorded, torch.no_grad():
        gm(*inputs)
    for name, error in opaque.items():
        log.kept.append(
            f"{prefix}{name}: not traceable by torch.fx ({_reason(error)}); kept as one opaque op, folded around"
        )
        if name in recorded:
            gm.set_submodule(name, _fold_module(gm.get_submodule(name), recorded[name], f"{prefix}{name}.", log))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _unsupplied_defaults(module: nn.Module, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The defaults of ``module.forward``'s arguments that ``inputs`` leave out (folded as constants).

    Tracing them as inputs would turn ``shift=None`` into a tensor placeholder (``shift is None``
    false), so defaults are used as the example call uses them.
    """
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    supplied = len(inputs)
    defaults = {}
    for index, parameter in enumerate(parameters):
        if parameter.default is inspect.Parameter.empty or (parameter.kind in positional and index < supplied):
            continue
        defaults[parameter.name] = parameter.default
    return defaults


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


@contextmanager
def _recorded_inputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[Any, ...]]]:
    """Record the positional inputs of each named submodule's first call (pre-hooks, always removed)."""
    inputs: dict[str, tuple[Any, ...]] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(child: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args)

        return hook

    try:
        for name in names:
            handles.append(module.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _fold_children(module: nn.Module, inputs: tuple[Any, ...], prefix: str, log: FoldLog) -> nn.Module:
    with _recorded_inputs(module, [name for name, _ in module.named_children()]) as child_inputs, torch.no_grad():
        module(*inputs)
    for name, child in list(module.named_children()):
        if name in child_inputs and not is_leaf(child):
            setattr(module, name, _fold_module(child, child_inputs[name], f"{prefix}{name}.", log))
    if isinstance(module, nn.Sequential):
        _fuse_sequential_pairs(module, prefix, log)
    return module


def _fuse_sequential_pairs(sequence: nn.Sequential, prefix: str, log: FoldLog) -> None:
    """Fold each ``nn.Conv2d``/``nn.Linear`` directly followed by a BatchNorm in ``sequence`` into it."""
    names = list(sequence._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = sequence._modules[first], sequence._modules[second]
        if type(layer) not in (nn.Conv2d, nn.Linear) or not isinstance(bn, _BatchNorm) or not is_leaf(bn):
            continue
        try:
            if isinstance(layer, nn.Conv2d):
                fused: nn.Module = algebra.to_conv2d(algebra.fuse_bn(ConvOp.from_module(layer), bn))
            else:
                fused = algebra.to_linear(*algebra.fuse_linear_bn(layer.weight.detach(), _detached(layer.bias), bn))
        except AlgebraError as error:
            log.kept.append(f"{prefix}{first} -> {prefix}{second}: {error}")
            continue
        sequence._modules[first], sequence._modules[second] = fused, nn.Identity()
        log.regions.append(
            FoldedRegion(f"{prefix}{first}", [f"{prefix}{first}", f"{prefix}{second}"], _describe(fused))
        )


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return (
            f"Conv2d({module.in_channels}->{module.out_channels}, kernel={tuple(module.kernel_size)}, "
            f"stride={tuple(module.stride)}, padding={tuple(module.padding)}, groups={module.groups})"
        )
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}->{module.out_features})"
    return type(module).__name__


# --- the graph pass -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expr:
    """``op(anchor)`` (``op=None``: the anchor itself), built from ``members`` costing ``cost`` MACs."""

    anchor: fx.Node
    op: ConvOp | None
    members: tuple[fx.Node, ...] = ()
    cost: int = 0


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> None:
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


class _NotConstant(Exception):
    """A node's value depends on the model's inputs."""


_CONV = {torch.conv2d}
_LINEAR = {F.linear}
_BATCH_NORM = {F.batch_norm}
_PAD = {F.pad}
_AVG_POOL = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}

_SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {
    "conv": (
        ("input", None),
        ("weight", None),
        ("bias", None),
        ("stride", 1),
        ("padding", 0),
        ("dilation", 1),
        ("groups", 1),
    ),
    "linear": (("input", None), ("weight", None), ("bias", None)),
    "batch_norm": (
        ("input", None),
        ("running_mean", None),
        ("running_var", None),
        ("weight", None),
        ("bias", None),
        ("training", False),
        ("momentum", 0.1),
        ("eps", 1e-5),
    ),
    "pad": (("input", None), ("pad", None), ("mode", "constant"), ("value", None)),
    "avg_pool": (
        ("input", None),
        ("kernel_size", None),
        ("stride", None),
        ("padding", 0),
        ("ceil_mode", False),
        ("count_include_pad", True),
        ("divisor_override", None),
    ),
    "dropout": (("input", None), ("p", 0.5), ("training", True), ("inplace", False)),
}


def _bind(node: fx.Node, signature: str) -> dict[str, Any]:
    """The call's arguments by name, with the function's defaults filled in."""
    names = [name for name, _ in _SIGNATURES[signature]]
    bound = {name: default for name, default in _SIGNATURES[signature]}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node) or ()
    return int(torch.Size(shape).numel())


def _macs(op: ConvOp, out: fx.Node) -> int:
    """Multiply-adds of ``op`` producing ``out``: ``numel(out) * in_channels/groups * kh * kw``."""
    return _numel(out) * op.weight.shape[1] * op.kernel_size[0] * op.kernel_size[1]


class _GraphFolder:
    """One pass over a traced graph: drop eval no-ops, build linear expressions, rewrite regions."""

    def __init__(self, gm: fx.GraphModule, prefix: str, log: FoldLog):
        self.gm, self.prefix, self.log = gm, prefix, log
        self.modules = dict(gm.named_modules())
        self.exprs: dict[fx.Node, _Expr] = {}
        self.absorbed: set[fx.Node] = set()
        self.forced: set[fx.Node] = set()  # materialised because a region through them would cost more MACs
        self.kept: list[str] = []
        self.splits: list[str] = []
        self.constants: dict[fx.Node, Any] = {}
        tensors = [*gm.parameters(), *gm.buffers()]
        self.device = tensors[0].device if tensors else torch.device("cpu")

    def run(self, inputs: tuple[Any, ...]) -> fx.GraphModule:
        self._drop_eval_noops()
        self._split_padding_modes()
        _propagate_shapes(self.gm, inputs)
        resolve_rank_checks(self.gm.graph)
        move_batch_norms_into_heads(self.gm)
        roots = self._settle_costs(self._regions())
        self.log.kept += self.kept + self.splits
        replaced: dict[fx.Node, fx.Node] = {}
        for root, expr in roots:  # in graph order, so an anchor is replaced before regions read it
            replaced[root] = self._rewrite(root, expr, replaced.get(expr.anchor, expr.anchor))
        self.gm.graph.eliminate_dead_code()
        self.gm.graph.lint()
        return fx.GraphModule(self.gm, self.gm.graph, self.gm.__class__.__name__)

    def _settle_costs(self, roots: list[tuple[fx.Node, _Expr]]) -> list[tuple[fx.Node, _Expr]]:
        """Split every region whose single conv would cost more multiply-adds than its ops, until none does.

        Finite: each round forces at least one node that was not forced before (see
        :meth:`_split_point`), and ``self.forced`` is a set of graph nodes, so there are at most
        ``len(graph.nodes)`` rounds.
        """
        while costly := [(root, expr) for root, expr in roots if _macs(expr.op, root) > expr.cost]:
            before = len(self.forced)
            for root, expr in costly:
                self.forced.update(self._split_point(expr))
                self.splits.append(
                    f"{self._name(root)}: one conv would cost {_macs(expr.op, root)} multiply-adds instead of "
                    f"{expr.cost}; folded in parts"
                )
            if len(self.forced) == before:  # cannot happen (see _split_point); never loop on it
                raise AssertionError(f"cost split made no progress on {[self._name(r) for r, _ in costly]}")
            roots = self._regions()
        return roots

    def _split_point(self, expr: _Expr) -> set[fx.Node]:
        """The nodes to materialise so that the costly region ``expr`` breaks at its first costly member.

        ``split`` is the first member whose own region costs more as one conv than its ops. Its
        inputs inside that region are forced; they were absorbed, hence not forced yet. If it has
        none, ``split`` is the first op of its chain (an average pool on the anchor, say): it is
        forced itself, and it was not forced yet either, since the region's consumer absorbed it.
        """
        split = next(m for m in expr.members if _macs(self.exprs[m].op, m) > self.exprs[m].cost)
        inputs = {node for node in split.all_input_nodes if node in self.exprs[split].members}
        return inputs or {split}

    def _regions(self) -> list[tuple[fx.Node, _Expr]]:
        """Build every node's linear expression; return the roots of regions with two or more ops."""
        self.exprs, self.absorbed, self.kept = {}, set(), []
        for node in list(self.gm.graph.nodes):
            expr = self._expression(node)
            if expr is not None:
                self.exprs[node] = expr
        return [(n, e) for n, e in self.exprs.items() if n not in self.absorbed and len(e.members) > 1]

    # -- eval no-ops ------------------------------------------------------------------------------

    def _drop_eval_noops(self) -> None:
        """Dropout (any kind) and ``nn.Identity`` compute the identity in eval mode: bypass them."""
        for node in list(self.gm.graph.nodes):
            if node.op == "call_module" and isinstance(self.modules[node.target], (_DropoutNd, nn.Identity)):
                what = f"{self.prefix}{node.target} ({type(self.modules[node.target]).__name__})"
            elif node.op == "call_function" and node.target in _DROPOUT and _bind(node, "dropout")["training"] is False:
                what = f"{node.name} ({node.target.__name__}, training=False)"
            else:
                continue
            node.replace_all_uses_with(node.args[0])
            self.gm.graph.erase_node(node)
            self.log.dropped.append(what)

    def _split_padding_modes(self) -> None:
        """A conv with ``padding_mode='reflect'`` (etc.) becomes ``F.pad(mode=...)`` then a zero-padded conv.

        The pad is not a convolution, but the conv after it then is one and can take a BatchNorm.
        """
        calls = [
            (node, self.modules[node.target])
            for node in self.gm.graph.nodes
            if node.op == "call_module"
            and isinstance(self.modules[node.target], nn.Conv2d)
            and self.modules[node.target].padding_mode != "zeros"
        ]
        for node, module in calls:  # every call first: a shared conv is converted once, after
            pads = tuple(module._reversed_padding_repeated_twice)
            with self.gm.graph.inserting_before(node):
                padded = self.gm.graph.call_function(F.pad, (node.args[0], pads), {"mode": module.padding_mode})
            node.args = (padded, *node.args[1:])
        for _, module in calls:
            module.padding, module.padding_mode = (0, 0), "zeros"

    # -- constants --------------------------------------------------------------------------------

    def _constant(self, value: Any) -> Any:
        """The value of ``value`` if it does not depend on the inputs (parameters, buffers, maths on them)."""
        if not isinstance(value, fx.Node):
            return value
        if value not in self.constants:
            self.constants[value] = self._evaluate(value)
        result = self.constants[value]
        if result is _NotConstant:
            raise _NotConstant(value.name)
        return result

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return reduce(getattr, node.target.split("."), self.gm)
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
            return _NotConstant
        try:
            args = fx.node.map_arg(node.args, self._constant)
            kwargs = fx.node.map_arg(node.kwargs, self._constant)
        except _NotConstant:
            return _NotConstant
        with torch.no_grad():
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

    def _tensor_constant(self, value: Any) -> Tensor | None:
        try:
            constant = self._constant(value)
        except _NotConstant:
            return None
        return constant.detach() if isinstance(constant, Tensor) else None

    # -- linear expressions -----------------------------------------------------------------------

    def _expression(self, node: fx.Node) -> _Expr | None:
        shape = _shape(node)
        if shape is None or len(shape) not in (2, 4) or not node.meta["tensor_meta"].dtype.is_floating_point:
            return None
        if _is_inplace(node) and len(node.args[0].users) > 1:
            return None  # others read the mutated tensor too
        try:
            return self._linear_step(node, len(shape))
        except _NotConstant:
            return None

    def _linear_step(self, node: fx.Node, rank: int) -> _Expr | None:
        if node.op == "call_module":
            return self._module_step(node, self.modules[node.target], rank)
        if node.op not in ("call_function", "call_method"):
            return None
        key = node.target
        if key in _CONV and rank == 4:
            bound = _bind(node, "conv")
            return self._chain(node, bound["input"], self._functional_conv(bound))
        if key in _LINEAR and rank == 2:
            bound = _bind(node, "linear")
            return self._chain(node, bound["input"], self._dense(bound["weight"], bound["bias"]))
        if key in _BATCH_NORM:
            bound = _bind(node, "batch_norm")
            if bound["training"] is not False or bound["running_mean"] is None:
                return None
            names = ("running_mean", "running_var", "weight", "bias")
            stats = [self._tensor_constant(bound[k]) for k in names]
            if any(value is None and bound[k] is not None for k, value in zip(names, stats)):
                return None  # statistics or affine parameters computed from the input
            affine = algebra.batch_norm_affine(stats[0], stats[1], stats[2], stats[3], bound["eps"])
            return self._chain(node, bound["input"], self._affine(node, *affine))
        if key in _PAD and rank == 4:
            return self._pad(node, _bind(node, "pad"))
        if key in _AVG_POOL and rank == 4:
            bound = _bind(node, "avg_pool")
            return self._avg_pool(node, bound)
        if key in _ADD | _SUB:
            return self._add(node, key in _SUB)
        if key in _MUL | _DIV:
            return self._scale(node, divide=key in _DIV)
        if key is operator.getitem and rank == 4:
            return self._crop(node)
        if key in _NEG:
            return self._chain(node, node.args[0], self._affine(node, torch.tensor(-1.0), None))
        return None

    def _module_step(self, node: fx.Node, module: nn.Module, rank: int) -> _Expr | None:
        if not is_leaf(module):
            return None  # an opaque (untraceable) module: whatever its class, its forward is its own
        source = node.args[0] if node.args else None
        if isinstance(module, nn.Conv2d) and rank == 4:
            try:
                op = ConvOp.from_module(module)
            except AlgebraError as error:
                self.kept.append(f"{self._name(node)}: {error}")
                return None
            return self._chain(node, source, self._then(op))
        if isinstance(module, nn.Linear) and rank == 2:
            return self._chain(node, source, self._dense(module.weight, module.bias))
        if isinstance(module, _BatchNorm):
            if module.running_mean is None:
                self.kept.append(f"{self._name(node)}: track_running_stats=False normalises with batch statistics")
                return None
            affine = algebra.batch_norm_affine(
                module.running_mean, module.running_var, _detached(module.weight), _detached(module.bias), module.eps
            )
            return self._chain(node, source, self._affine(node, *affine))
        if isinstance(module, nn.AvgPool2d):
            bound = {
                "kernel_size": module.kernel_size,
                "stride": module.stride,
                "padding": module.padding,
                "ceil_mode": module.ceil_mode,
                "count_include_pad": module.count_include_pad,
                "divisor_override": module.divisor_override,
                "input": source,
            }
            return self._avg_pool(node, bound)
        if isinstance(module, nn.ConstantPad2d):
            return self._pad(node, {"input": source, "pad": module.padding, "mode": "constant", "value": module.value})
        return None

    # -- one-input steps: each maps the source's operator (None = identity) to this node's ---------

    def _then(self, op: ConvOp) -> Callable[[ConvOp | None, fx.Node], ConvOp]:
        return lambda previous, anchor: op if previous is None else algebra.sequential(previous, op)

    def _functional_conv(self, bound: dict[str, Any]) -> Callable[[ConvOp | None, fx.Node], ConvOp]:
        weight = self._tensor_constant(bound["weight"])
        if weight is None:
            raise _NotConstant("conv weight")
        bias = self._constant_bias(bound["bias"], weight)
        padding = bound["padding"]
        if isinstance(padding, str):
            padding = algebra._resolve_string_padding(
                padding, tuple(weight.shape[2:]), algebra._pair(bound["dilation"])
            )
        op = ConvOp(
            weight,
            bias,
            algebra._pair(bound["stride"]),
            algebra._pair(padding),
            algebra._pair(bound["dilation"]),
            int(bound["groups"]),
        )
        return self._then(op)

    def _constant_bias(self, bias: Any, weight: Tensor) -> Tensor:
        """The bias as a constant tensor (zeros when absent); raises :class:`_NotConstant` otherwise."""
        if bias is None:
            return weight.new_zeros(weight.shape[0])
        value = self._tensor_constant(bias)
        if value is None:
            raise _NotConstant("bias")
        return value

    def _dense(self, weight: Any, bias: Any) -> Callable[[ConvOp | None, fx.Node], ConvOp]:
        """``nn.Linear``/``F.linear`` as a 1x1 conv over ``(N, features, 1, 1)``."""
        weight_ = self._tensor_constant(weight)
        if weight_ is None:
            raise _NotConstant("linear weight")
        bias_ = self._constant_bias(bias, weight_)
        return self._then(ConvOp(weight_[:, :, None, None], bias_))

    def _affine(self, node: fx.Node, scale: Tensor, shift: Tensor | None) -> Callable[[ConvOp | None, fx.Node], ConvOp]:
        def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
            return algebra.channel_affine(previous or self._identity(anchor), scale, shift)

        return step

    def _identity(self, source: fx.Node) -> ConvOp:
        """The identity on ``source``'s channels as a depthwise 1x1 conv."""
        meta = source.meta["tensor_meta"]
        channels = meta.shape[1]
        return algebra.identity(channels, 1, groups=channels, dtype=meta.dtype, device=self.device)

    def _pad(self, node: fx.Node, bound: dict[str, Any]) -> _Expr | None:
        """Zero padding after a pointwise op whose bias equals the pad value is that op with more padding."""
        if bound["mode"] != "constant" or not _static(bound["pad"], bound["value"]) or len(bound["pad"]) not in (2, 4):
            return None
        value = float(bound["value"] or 0.0)

        def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
            op = previous or self._identity(anchor)
            if op.kernel_size != (1, 1) or op.stride != (1, 1) or op.dilation != (1, 1):
                raise AlgebraError(f"padding after a {op.kernel_size} conv is not a conv's padding")
            if not bool((op.bias == value).all()):
                raise AlgebraError(f"pad value {value} differs from the bias it pads (the border would change)")
            return algebra.pad_input(op, list(bound["pad"]))

        return self._chain(node, bound["input"], step)

    def _avg_pool(self, node: fx.Node, bound: dict[str, Any]) -> _Expr | None:
        if not _static(*(bound[k] for k in ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))):
            return None
        padded = algebra._pair(bound["padding"]) != (0, 0)
        if bound["ceil_mode"] or (padded and not bound["count_include_pad"]) or bound["divisor_override"] is not None:
            self.kept.append(
                f"{self._name(node)}: only avg-pool with ceil_mode=False and, when it pads, count_include_pad=True "
                "folds (otherwise border windows have their own divisor)"
            )
            return None

        def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
            meta = node.meta["tensor_meta"]  # pooling keeps the channels
            pool = algebra.avg_pool(
                meta.shape[1],
                bound["kernel_size"],
                bound["stride"] or None,
                bound["padding"],
                dtype=meta.dtype,
                device=self.device,
            )
            return pool if previous is None else algebra.sequential(previous, pool)

        return self._chain(node, bound["input"], step)

    def _crop(self, node: fx.Node) -> _Expr | None:
        """``x[:, :, c:-c, :]`` and the like (ACNet's crop before a 1xk conv): a shift the next conv absorbs."""
        rows_cols = _symmetric_crop(node.args[1]) if len(node.args) == 2 else None
        if rows_cols is None:
            return None

        def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
            meta = node.meta["tensor_meta"]
            op = algebra.crop(meta.shape[1], *rows_cols, dtype=meta.dtype, device=self.device)
            return op if previous is None else algebra.sequential(previous, op)

        return self._chain(node, node.args[0], step)

    def _scale(self, node: fx.Node, divide: bool) -> _Expr | None:
        """``x * c`` / ``x / c`` with ``c`` a constant scalar or per-channel tensor."""
        split = self._split_constant(node)
        if split is None or node.kwargs or (divide and not split[2]):
            return None
        variable, factor, _ = split
        return self._chain(node, variable, self._affine(node, 1.0 / factor if divide else factor, None))

    def _split_constant(self, node: fx.Node) -> tuple[fx.Node, Tensor, bool] | None:
        """``(variable, per-channel constant, variable is the left operand)`` of a binary op, if one is constant."""
        if len(node.args) != 2:
            return None
        for variable, constant, is_left in ((node.args[0], node.args[1], True), (node.args[1], node.args[0], False)):
            if not isinstance(variable, fx.Node) or self._tensor_constant(variable) is not None:
                continue
            vector = self._channel_vector(node, self._tensor_or_number(constant))
            if vector is not None:
                return variable, vector, is_left
        return None

    def _tensor_or_number(self, value: Any) -> Tensor | None:
        """A constant operand as a tensor; Python numbers in float64, so ``x * 0.1`` folds to 0.1's double."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64, device=self.device)
        return self._tensor_constant(value) if isinstance(value, fx.Node) else None

    def _channel_vector(self, node: fx.Node, constant: Tensor | None) -> Tensor | None:
        """``constant`` as one value per channel of ``node``'s output, if it broadcasts that way."""
        shape = _shape(node)
        if constant is None or shape is None or constant.dim() > len(shape):
            return None
        if constant.numel() == 1:
            return constant.reshape(())
        aligned = (1,) * (len(shape) - constant.dim()) + tuple(constant.shape)
        if any(size != 1 for i, size in enumerate(aligned) if i != 1) or aligned[1] != shape[1]:
            return None
        return constant.reshape(-1)

    # -- composing ------------------------------------------------------------------------------

    def _source_expr(self, source: fx.Node, consumer: fx.Node) -> tuple[_Expr, bool]:
        """The source's expression if the consumer may absorb it (its only user), else the source itself."""
        expr = self.exprs.get(source)
        if expr is not None and len(source.users) == 1 and consumer in source.users and source not in self.forced:
            return expr, True
        return _Expr(source, None), False

    def _chain(self, node: fx.Node, source: Any, step: Callable[[ConvOp | None, fx.Node], ConvOp]) -> _Expr | None:
        if not isinstance(source, fx.Node) or _shape(source) is None:
            return None
        own_cost = self._own_cost(node)
        expr, absorbable = self._source_expr(source, node)
        if absorbable:
            try:
                op = step(expr.op, expr.anchor)
                return self._accept([source], _Expr(expr.anchor, op, expr.members + (node,), expr.cost + own_cost))
            except AlgebraError as error:
                self.kept.append(f"{self._name(node)} kept apart from {self._name(source)}: {error}")
        try:
            op = step(None, source)
        except AlgebraError as error:
            self.kept.append(f"{self._name(node)}: {error}")
            return None
        return _Expr(source, op, (node,), own_cost)

    def _accept(self, sources: list[fx.Node], expr: _Expr) -> _Expr:
        self.absorbed.update(sources)
        return expr

    def _own_cost(self, node: fx.Node) -> int:
        """MACs (convs, linears) or elementwise operations (everything else) ``node`` itself performs."""
        weight = None
        if node.op == "call_module" and isinstance(self.modules[node.target], (nn.Conv2d, nn.Linear)):
            weight = self.modules[node.target].weight
        elif node.target in _CONV or node.target in _LINEAR:
            weight = self._tensor_constant(node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None))
        if weight is None:
            return _numel(node) * self._pool_taps(node)
        taps = weight.shape[2] * weight.shape[3] if weight.dim() == 4 else 1
        return _numel(node) * weight.shape[1] * taps

    def _pool_taps(self, node: fx.Node) -> int:
        """``kh * kw`` for an average pool (each output sums that many inputs), 1 for other elementwise ops."""
        if node.op == "call_module" and isinstance(self.modules[node.target], nn.AvgPool2d):
            kernel = self.modules[node.target].kernel_size
        elif node.op == "call_function" and node.target in _AVG_POOL:
            kernel = _bind(node, "avg_pool")["kernel_size"]
        else:
            return 1
        kh, kw = algebra._pair(kernel)
        return kh * kw

    def _add(self, node: fx.Node, subtract: bool) -> _Expr | None:
        """Branches of one anchor add up; ``x + c`` with a per-channel constant shifts the bias."""
        if node.kwargs:
            return None  # alpha=..., out=...
        split = self._split_constant(node)
        if split is not None:
            variable, constant, is_left = split
            factor = -1.0 if subtract and not is_left else 1.0  # c - x
            shift = -constant if subtract and is_left else constant  # x - c
            return self._chain(node, variable, self._affine(node, torch.tensor(factor), shift))
        left, right = node.args[0], node.args[1]
        if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
            return None
        if not _shape(left) == _shape(right) == _shape(node):
            return None  # broadcasting
        return self._add_branches(node, left, right, -1.0 if subtract else 1.0)

    def _add_branches(self, node: fx.Node, left: fx.Node, right: fx.Node, sign: float) -> _Expr | None:
        if left is right:
            (a, a_ok), (b, b_ok) = (_Expr(left, None), False), (_Expr(left, None), False)
        else:
            (a, a_ok), (b, b_ok) = self._source_expr(left, node), self._source_expr(right, node)
        if a.anchor is not b.anchor:
            return None
        try:
            ops = [a.op or self._identity(a.anchor), algebra.scale(b.op or self._identity(b.anchor), sign)]
            op = algebra.add(ops, [self._name(left), self._name(right)])
            expr = _Expr(a.anchor, op, a.members + b.members + (node,), a.cost + b.cost + _numel(node))
            return self._accept([s for s, ok in ((left, a_ok), (right, b_ok)) if ok], expr)
        except AlgebraError as error:
            self.kept.append(f"{self._name(node)}: branches not merged: {error}")
            return None

    # -- rewriting --------------------------------------------------------------------------------

    def _rewrite(self, root: fx.Node, expr: _Expr, anchor: fx.Node) -> fx.Node:
        """Replace the region ending at ``root`` by one conv/linear module reading ``anchor``."""
        if len(_shape(root)) == 4:
            module: nn.Module = algebra.to_conv2d(expr.op)
        else:
            dense = algebra.regroup(expr.op, 1)
            module = algebra.to_linear(dense.weight[:, :, 0, 0], dense.bias)
        name = self._new_name(expr.members)
        self.gm.add_submodule(name, module)
        with self.gm.graph.inserting_after(root):
            new = self.gm.graph.call_module(name, (anchor,))
        new.meta = dict(root.meta)
        root.replace_all_uses_with(new)
        members = [self._name(m) for m in expr.members]
        feeds = [f"{self.prefix}{user.target}" for user in new.users if user.op == "call_module"]
        self.log.regions.append(FoldedRegion(self.prefix + name, members, _describe(module), feeds))
        return new

    def _new_name(self, members: Sequence[fx.Node]) -> str:
        """``<common module path of the members>.fused`` (``_1``, ``_2``... when taken)."""
        paths = [self._origin(m).split(".")[:-1] for m in members if self._origin(m)]
        common: list[str] = []
        for parts in zip(*paths) if paths else ():
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        executed = {node.target for node in self.gm.graph.nodes if node.op == "call_module"}
        while common and ".".join(common) in executed:
            common.pop()  # never add a child to a layer that runs
        base = ".".join([*common, "fused"])
        name, index = base, 0
        while _has_attribute(self.gm, name):  # finite: the module has finitely many attributes
            index += 1
            name = f"{base}_{index}"
        return name

    def _origin(self, node: fx.Node) -> str:
        """The parameter or module path a node computes with (``""`` when it reads none)."""
        if node.op == "call_module":
            return f"{node.target}.forward"
        if node.op == "get_attr":
            return node.target
        for argument in node.all_input_nodes:
            if argument.op == "get_attr" or (
                argument in self.constants and self.constants[argument] is not _NotConstant
            ):
                found = self._origin(argument)
                if found:
                    return found
        return ""

    def _name(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"{self.prefix}{node.target}"
        origin = self._origin(node)
        return f"{self.prefix}{node.name}" + (f"[{self.prefix}{origin}]" if origin else "")


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _symmetric_crop(index: Any) -> tuple[int, int] | None:
    """``(rows, cols)`` for an index ``[:, :, r:-r, c:-c]`` (``:`` for 0), on any input size; else None."""
    if not isinstance(index, tuple) or len(index) != 4 or any(not isinstance(i, slice) for i in index):
        return None
    if any(i != slice(None) for i in index[:2]):
        return None
    crops = []
    for part in index[2:]:
        if part == slice(None):
            crops.append(0)
        elif part.step is None and isinstance(part.start, int) and part.start > 0 and part.stop == -part.start:
            crops.append(part.start)
        else:
            return None
    return crops[0], crops[1]


def _static(*values: Any) -> bool:
    """No value (nor element of a tuple/list value) is computed in the graph."""
    return not any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and not _static(*v)) for v in values)


def _is_inplace(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y``, ...: the node's first argument is overwritten."""
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.op == "call_function" and node.target in _INPLACE_OPERATORS


def _has_attribute(module: nn.Module, dotted: str) -> bool:
    try:
        reduce(getattr, dotted.split("."), module)
    except AttributeError:
        return False
    return True


def _detached(tensor: Tensor | None) -> Tensor | None:
    return tensor.detach() if tensor is not None else None
