"""The one tracer policy of trainfer: ``torch.fx`` in eval mode, untraceable modules kept as opaque leaves.

The folder and output-kind detection (:func:`trainfer.serve.outputs.detect_output_kind`) both
trace with :func:`trace`. It sees through every module that is not a ``torch.nn`` layer (nor of a
type in the ``leaf_types`` a call passes: the types its fold handlers are for), so what user
blocks compute appears as calls on parameters.
When some module's ``forward`` cannot be traced (item assignment on a tensor, data-dependent
control flow), :func:`trace_around_untraceable` finds the innermost such module, makes it a leaf
(one ``call_module`` node whose insides the folder does not see) and traces again, so that one
untraceable op does not switch folding off above it.

Threads: while it traces, torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the
whole process. :func:`trace` therefore traces one model at a time (two interleaved traces would
undo each other's patches out of order and leave one in place), and its tracer lets calls from
every other thread pass through untouched: a model that other threads are running meanwhile
(a Predictor serving it while it is saved or deployed) computes as usual, never with proxies.

Two ways libraries write ``forward`` are traced as the model runs them: a forward wrapped by a
``functools.wraps`` decorator (the wrapper runs, called with the example's arguments by keyword;
see :func:`trace_arguments`), and a result that is a ``dict`` subclass (``OrderedDict``, Hugging
Face's ``ModelOutput``), rebuilt as its own type by the graph instead of a plain ``dict``.

Item assignment into a tensor that the traced code itself just made by padding (``out =
F.pad(x, p); out[:, :, :p] = v``, DBB's ``BNAndPad`` writing its border) is traced as the pure
call :func:`assign` whose result every later use of ``out`` reads: nothing else can hold that
tensor (nothing has read it yet), so no alias sees the difference. Item assignment anywhere else
still fails the trace (the module stays an opaque leaf, as before).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import PH
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Untraceable",
    "assign",
    "is_leaf",
    "preserve_attributes",
    "trace",
    "trace_arguments",
    "trace_around_untraceable",
]

#: What fixes the arguments a trace does not take as inputs: ``{name: value}`` (``concrete_args``),
#: or, for a decorated forward, the names its inputs are passed by (see :func:`trace_arguments`).
Concrete = dict[str, Any] | tuple[str, ...]

#: One trace at a time in the process (see the module docstring); re-entrant for nested traces.
_TRACE_LOCK = threading.RLock()

#: The attribute an exception carries, once, naming the innermost module whose forward raised it.
_CULPRIT = "_trainfer_untraceable_module"


def is_torch_nn(function: Any) -> bool:
    """``function`` is defined by ``torch.nn`` (a layer's own ``forward``)."""
    return (getattr(function, "__module__", None) or "").startswith(("torch.nn", "torch.ao.nn"))  # fx code: None


def is_leaf(module: nn.Module, leaf_types: frozenset[type[nn.Module]] = frozenset()) -> bool:
    """A layer: its ``forward`` is torch's own, or that of a type in ``leaf_types``; not a container."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    forward = type(module).forward
    registered = any(forward is leaf_type.forward for leaf_type in leaf_types)
    return (is_torch_nn(forward) or registered) and not isinstance(module, containers)


class _EvalTracer(fx.Tracer):
    """Trace through everything that is not a ``torch.nn`` layer, except the ``opaque`` modules.

    A module is a leaf iff its ``forward`` is torch's own (``nn.Conv2d``, a user ``class
    MyBN(nn.BatchNorm2d): pass``), containers excepted, or it is named in ``opaque``. Subclasses
    that override ``forward`` (a BatchNorm with an extra activation, a weight-standardised conv)
    are traced into, so what they compute appears as ``F.batch_norm``/``F.conv2d`` calls on
    parameters. An exception raised while tracing a module's ``forward`` is tagged with that
    module's name (the innermost one: tags are never overwritten on the way out).

    The shapes of parameters are constants (``param_shapes_constant``): ``o, i, h, w =
    self.weight.size()`` and ``int(o / groups)`` give Python ints, as they do when the model runs,
    so a block that generates its weight from parameters (OREPA) traces, and the folder evaluates
    the generation once (:mod:`~trainfer.reparam.fold.constants`).
    """

    def __init__(self, opaque: frozenset[str] = frozenset(), leaf_types: frozenset[type[nn.Module]] = frozenset()):
        super().__init__(param_shapes_constant=True)
        self.opaque, self.leaf_types = opaque, leaf_types
        self.thread = threading.get_ident()  # the tracing thread; calls from others pass through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m, self.leaf_types) or module_qualified_name in self.opaque

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        """As fx's, except that a ``dict`` subclass is rebuilt as its own type (fx makes it a ``dict``):
        called with the items by keyword where the keys are names (a dataclass such as Hugging Face's
        ``ModelOutput`` sets its attributes so), else with the items as one dict."""
        if isinstance(a, dict) and type(a) is not dict:
            items = cast(dict[Any, Any], super().create_arg(dict(a)))
            if all(isinstance(key, str) for key in items):
                return self.create_node("call_function", type(a), (), items)
            return self.create_node("call_function", type(a), (items,), {})
        return super().create_arg(a)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:  # another thread runs a model while this one traces
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, _CULPRIT):
                try:
                    setattr(error, _CULPRIT, self.path_of_module(m))
                except (NameError, AttributeError):  # a module built inside forward: no name to make a leaf of
                    pass
            raise


def trace_arguments(
    module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], Concrete]:
    """The graph's positional inputs for the call ``module(*args, **kwargs)``, and what fixes the rest.

    The traced graph takes every argument the call supplies, positionally in ``forward``'s order;
    an argument left out between two supplied ones is given its default, and every argument left
    out is fixed to its default (tracing ``shift=None`` as an input would make ``shift is None``
    false). A forward wrapped with ``functools.wraps`` is traced through its wrapper, called with
    the supplied arguments by keyword (fx would pass the wrapper its inner function's defaults
    positionally): the second value is then the tuple of their names. Raises :class:`Untraceable`
    when the call fills ``*args``/``**kwargs`` or does not fit the signature.
    """
    forward = type(module).forward
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        return tuple(args), {}
    try:
        bound = signature.bind(module, *args, **kwargs).arguments
    except TypeError as error:
        raise Untraceable(error) from error
    parameters = list(signature.parameters.values())[1:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(p.kind in variadic and bound.get(p.name) for p in parameters):
        raise Untraceable(TypeError(f"forward of {type(module).__name__} is called with *args or **kwargs"))
    named = [p for p in parameters if p.kind not in variadic]
    supplied = [p for p in named if p.name in bound]
    if hasattr(forward, "__wrapped__"):
        return tuple(bound[p.name] for p in supplied), tuple(p.name for p in supplied)
    last = named.index(supplied[-1]) + 1 if supplied else 0
    inputs = tuple(bound.get(p.name, p.default) for p in named[:last])
    concrete = {p.name: p.default for p in named if p.name not in bound and p.default is not inspect.Parameter.empty}
    return inputs, concrete


@contextmanager
def _called_by_keyword(model: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    """``model``'s class swapped, for the trace, for a subclass whose ``forward(*inputs)`` calls the
    original forward with ``inputs`` by the keywords ``names``."""
    original = type(model)
    wrapped = original.forward

    def forward(self: nn.Module, *inputs: Any) -> Any:
        return wrapped(self, **dict(zip(names, inputs)))

    model.__class__ = type(original.__name__, (original,), {"forward": forward})
    try:
        yield
    finally:
        model.__class__ = original


def _accept_any_dim(input: Tensor) -> None:
    """Stand-in for ``_check_input_dim``, whose ``if input.dim() != 4`` cannot be traced."""


@contextmanager
def _rank_checks_off(model: nn.Module) -> Iterator[None]:
    """Disable ``_check_input_dim`` on BatchNorm subclasses that override ``forward``, for the trace only."""
    patched = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not is_torch_nn(type(m).forward) and "_check_input_dim" not in vars(m)
    ]
    try:
        for module in patched:
            vars(module)["_check_input_dim"] = _accept_any_dim  # an instance attribute shadowing the method
        yield
    finally:
        for module in patched:
            del vars(module)["_check_input_dim"]


def trace(
    model: nn.Module,
    concrete_args: Concrete | None = None,
    opaque: frozenset[str] = frozenset(),
    leaf_types: frozenset[type[nn.Module]] = frozenset(),
) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` in its current mode; modules named in ``opaque``, and modules
    of the ``leaf_types`` (:func:`is_leaf`), stay leaves.

    ``concrete_args`` fixes arguments of ``forward`` to values (traced as constants; the graph
    asserts that calls pass the same values); a tuple of names instead makes the graph's inputs
    those keyword arguments of a decorated forward (:func:`trace_arguments`). ``model`` is left as it was.

    BatchNorm subclasses that override ``forward`` and call ``super().forward`` have their input
    rank check disabled while tracing, so that the trace can see through them.
    """
    with _TRACE_LOCK:
        tracer = _EvalTracer(opaque, leaf_types)
        name = type(model).__name__
        if isinstance(concrete_args, tuple):
            with _rank_checks_off(model), _called_by_keyword(model, concrete_args):
                graph = tracer.trace(model, tuple(PH for _ in concrete_args))  # type: ignore[arg-type]  # fx takes a tuple too
            inputs = [node for node in graph.nodes if node.op == "placeholder"]
            for node, keyword in zip(inputs, concrete_args):
                node.target = keyword  # the graph's forward takes them by the model's names, not input_0, ...
        else:
            with _rank_checks_off(model):
                graph = tracer.trace(model, concrete_args)
        return fx.GraphModule(tracer.root, graph, name)


def assign(tensor: Tensor, index: Any, value: Any) -> Tensor:
    """``tensor`` with ``tensor[index] = value`` applied, as a new tensor (the traced form of item assignment)."""
    result = tensor.clone()
    result[index] = value
    return result


#: Calls whose result is a tensor of its own (no view of an input): item assignment into one traces.
_FRESH = frozenset({F.pad, assign})


class _AssignableProxy(fx.Proxy):
    """A proxy that traces ``proxy[index] = value`` as :func:`assign` where the write cannot be seen
    through an alias: the tensor was made by padding (or by an earlier such write) and nothing read it yet."""

    def __setitem__(self, index: Any, value: Any) -> None:
        node = self.node
        if not (node.op == "call_function" and node.target in _FRESH and not node.users):
            # fx's own tracing error (a ValueError): the caller falls back as for any untraceable forward
            raise fx.proxy.TraceError("item assignment into a tensor that may be read through an alias")
        self.node = self.tracer.create_proxy("call_function", assign, (self, index, value), {}).node


def preserve_attributes(gm: fx.GraphModule, values: Mapping[str, Any]) -> None:
    """Set plain attributes on ``gm`` that survive ``copy.deepcopy`` (which rebuilds a ``GraphModule``
    from its graph and would drop attributes the graph does not read).

    torch.fx has no public way: ``GraphModule.__deepcopy__`` restores the private
    ``meta["_user_preserved_attributes"]``. This function is the one place that relies on it;
    ``tests/test_fold_robustness.py`` checks a deep copy keeps them.
    """
    for name, value in values.items():
        setattr(gm, name, value)
    gm.meta.setdefault("_user_preserved_attributes", {}).update(values)


class Untraceable(Exception):
    """``model``'s own ``forward`` (not one of its submodules') cannot be traced; ``error`` says why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def trace_around_untraceable(
    model: nn.Module, concrete_args: Concrete | None = None, leaf_types: frozenset[type[nn.Module]] = frozenset()
) -> tuple[fx.GraphModule, dict[str, Exception]]:
    """Trace ``model`` (see :func:`trace`), keeping each submodule whose ``forward`` cannot be traced as an opaque leaf.

    Returns the graph module and ``{qualified name: the error its trace raised}``. Raises
    :class:`Untraceable` when the failure lies in ``model``'s own ``forward``. Finite: every retry
    adds a new name to the opaque set (a tagged module was traced into, so it was not opaque),
    and ``model`` has finitely many submodules.
    """
    opaque: dict[str, Exception] = {}
    while True:
        try:
            return trace(model, concrete_args, frozenset(opaque), leaf_types), opaque
        except Exception as error:  # noqa: BLE001 - user forward code can raise anything on fx proxies
            culprit = getattr(error, _CULPRIT, "")
            if not culprit or culprit in opaque:
                raise Untraceable(error) from error
            opaque[culprit] = error
