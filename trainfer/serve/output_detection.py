"""Detecting a model's output kind (:func:`detect_output_kind`): logits, probabilities or log-probabilities.

:func:`detect_output_kind` reads the kind from the final operation of the model's traced eval
graph (torch.fx, with the folder's tracer :func:`trainfer.reparam.fold.trace.trace`), looking
through shape-only operations (``flatten``, ``view``, ``squeeze``, ...).
When tracing fails it runs the model once on example inputs and looks at the aten operator that
produced the output (again through reshapes).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from trainfer.errors import InputError
from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.trace import trace
from trainfer.serve.output_kinds import OutputKind
from trainfer.serve.output_structure import Selector, pick, select_output

__all__ = ["detect_output_kind"]

_PROBABILITY_MODULES: dict[type[nn.Module], str] = {
    nn.Softmax: "probabilities",
    nn.Sigmoid: "probabilities",
    nn.LogSoftmax: "log_probabilities",
}
_PROBABILITY_FUNCTIONS: dict[Any, str] = {
    torch.softmax: "probabilities",
    F.softmax: "probabilities",
    torch.special.softmax: "probabilities",
    torch.sigmoid: "probabilities",
    F.sigmoid: "probabilities",
    torch.special.expit: "probabilities",
    torch.log_softmax: "log_probabilities",
    F.log_softmax: "log_probabilities",
    torch.special.log_softmax: "log_probabilities",
}
_PROBABILITY_METHODS = {"softmax": "probabilities", "sigmoid": "probabilities", "log_softmax": "log_probabilities"}

# Operations that change neither values nor their meaning: detection looks through them.
_SHAPE_METHODS = frozenset(
    {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "float", "double", "to", "clone", "detach"}
)
_SHAPE_FUNCTIONS = frozenset({torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape})
_SHAPE_MODULES = (nn.Flatten, nn.Identity, nn.Unflatten)
# The same, as executed aten operators (for models torch.fx cannot trace).
_ATEN_KINDS = {
    "_softmax": "probabilities",
    "softmax": "probabilities",
    "sigmoid": "probabilities",
    "_log_softmax": "log_probabilities",
    "log_softmax": "log_probabilities",
}
_ATEN_SHAPE_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "squeeze",
        "unsqueeze",
        "flatten",
        "clone",
        "alias",
        "detach",
        "select",
        "slice",
        "_to_copy",
        "contiguous",
    }
)


def detect_output_kind(model: nn.Module, output: Selector = None, example_inputs: Any = None) -> OutputKind:
    """Decide the kind of output ``output`` of ``model`` from the final op of its traced eval graph.

    ``model`` must already be in eval mode (the graph is the inference graph). When torch.fx cannot
    trace the model, one forward pass on ``example_inputs`` (if given) finds the executed aten
    operator that produced the output; without example inputs the kind defaults to logits.
    """
    try:
        graph = trace(model)  # the folder's tracer policy: the graph the deployed form is folded from
    except Exception as error:  # tracing fails in many ways on real models; fall back, never crash
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return _detect_from_executed_ops(model, output, example_inputs, reason)
    node = _final_node(graph, output)
    found = _classify(graph, node)
    if found is not None:
        return OutputKind(found[0], f"detected: final op {found[1]} in the traced eval graph")
    return OutputKind(
        "logits", f"detected: final op {_describe(graph, node)} is not softmax/log_softmax/sigmoid (traced eval graph)"
    )


def _final_node(graph: fx.GraphModule, which: Selector) -> fx.Node:
    result = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    if isinstance(result, fx.Node) and result.op == "call_function" and isinstance(result.target, type):
        fields = getattr(result.target, "_fields", ())  # a named tuple built in forward
        result = dict(zip(fields, result.args, strict=False)) if isinstance(which, str) else tuple(result.args)
    if not isinstance(result, fx.Node):
        result = pick(result, which)
    elif which not in (None, 0):
        raise InputError(f"output={which!r} selects from a tuple or dict, but the model returns one tensor")
    if not isinstance(result, fx.Node):
        raise InputError(f"output {which!r} of the traced graph is {type(result).__name__}, not a tensor")
    while (source := _through_shape_op(graph, result)) is not None:
        result = source
    return result


def _through_shape_op(graph: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return first
    if node.op == "call_function" and (node.target in _SHAPE_FUNCTIONS or node.target is operator.getitem):
        return first if node.target is not operator.getitem or _is_shape_index(node.args[1]) else None
    if node.op == "call_module" and isinstance(graph.get_submodule(target_name(node)), _SHAPE_MODULES):
        return first
    return None


def _is_shape_index(index: Any) -> bool:
    """``x[:, 0]``-style indexing that picks positions without changing values' meaning."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, slice | int) or i is None or i is Ellipsis for i in items)


def _classify(graph: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    if node.op == "call_module":
        module = graph.get_submodule(target_name(node))
        for cls, kind in _PROBABILITY_MODULES.items():
            if isinstance(module, cls):
                return kind, f"{type(module).__name__} module {node.target!r}"
    elif node.op == "call_function" and node.target in _PROBABILITY_FUNCTIONS:
        return _PROBABILITY_FUNCTIONS[node.target], f"{_qualname(node.target)}"
    elif node.op == "call_method" and node.target in _PROBABILITY_METHODS:
        return _PROBABILITY_METHODS[node.target], f"Tensor.{node.target}"
    return None


def _describe(graph: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(graph.get_submodule(target_name(node))).__name__} module {node.target!r}"
    if node.op == "call_function":
        return _qualname(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"{node.op} {node.target!r}"


def _qualname(target: Any) -> str:
    module = getattr(target, "__module__", None) or "torch"
    return f"{module}.{getattr(target, '__name__', repr(target))}"


def _detect_from_executed_ops(model: nn.Module, which: Selector, example_inputs: Any, reason: str) -> OutputKind:
    """Run the model once and find the aten op that produced the selected output (through reshapes)."""
    from trainfer.opcount import AtenOpCounter

    if example_inputs is None:
        return OutputKind("logits", f"default: tracing failed ({reason}) and no example inputs; assumed logits")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    producers: dict[int, tuple[str, Tensor | None, Tensor]] = {}

    def observe(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        if isinstance(out, Tensor):  # the result is kept alive so that ids stay unique during the run
            source = next((a for a in args if isinstance(a, Tensor)), None)
            producers[id(out)] = (func.overloadpacket.__name__, source, out)

    with torch.no_grad(), AtenOpCounter(observe):
        tensor: Tensor | None = select_output(model(*inputs), which)
    while tensor is not None and id(tensor) in producers:
        op, source, _ = producers[id(tensor)]
        if op in _ATEN_KINDS:
            return OutputKind(_ATEN_KINDS[op], f"detected: final executed op aten.{op} (tracing failed: {reason})")
        if op not in _ATEN_SHAPE_OPS:
            return OutputKind(
                "logits",
                f"detected: final executed op aten.{op} is not softmax/log_softmax/sigmoid (tracing failed: {reason})",
            )
        tensor = source
    return OutputKind("logits", f"default: the output is not computed by an op (tracing failed: {reason})")
