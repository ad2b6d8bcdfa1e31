"""What a model's output means: logits, probabilities or log-probabilities — and which output.

Real training code ends ``forward`` in raw logits, in ``softmax``/``log_softmax``, or in
``sigmoid``. Serving must turn each into probabilities exactly once:

=====================  =============================  ==============================
output kind            classification scores          binary scores
=====================  =============================  ==============================
``logits``             ``softmax(z, dim=1)``          ``sigmoid(z)``
``probabilities``      ``p`` (as is)                  ``p`` (as is)
``log_probabilities``  ``exp(l)``                     ``exp(l)``
=====================  =============================  ==============================

Regression outputs are values and are never transformed. A binary model may also return two
columns; its score is then column 1 of the classification scores.

:func:`detect_output_kind` reads the kind from the final operation of the model's traced eval
graph (torch.fx, with the folder's tracer :func:`trainfer.reparam.fold.trace.trace`), looking
through shape-only operations (``flatten``, ``view``, ``squeeze``, ...).
When tracing fails it runs the model once on example inputs and looks at the aten operator that
produced the output (again through reshapes).
:func:`select_output` picks the prediction from tuple, named-tuple and dict outputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from trainfer.errors import InputError
from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.trace import trace

OutputKindName = Literal["logits", "probabilities", "log_probabilities"]
TaskName = Literal["classification", "binary", "regression", "sequence"]
OUTPUT_KINDS: tuple[OutputKindName, ...] = get_args(OutputKindName)
TASKS: tuple[TaskName, ...] = get_args(TaskName)
Selector = int | str | None

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

__all__ = [
    "OUTPUT_KINDS",
    "TASKS",
    "Head",
    "OutputKind",
    "check_kind",
    "check_task",
    "check_output_kind",
    "describe_structure",
    "detect_output_kind",
    "flatten_outputs",
    "resolve_heads",
    "select_output",
    "to_scores",
]


@dataclass(frozen=True)
class OutputKind:
    """An output kind and how it was decided (recorded in the bundle manifest)."""

    kind: str
    decided_by: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "decided_by": self.decided_by}


def check_kind(kind: str) -> str:
    if kind not in OUTPUT_KINDS:
        raise InputError(f"output_kind must be one of {list(OUTPUT_KINDS)}; got {kind!r}")
    return kind


# --------------------------------------------------------------------------- output structure
def select_output(output: Any, which: Selector = None) -> Tensor:
    """The prediction tensor inside ``output``: ``which`` is a tuple index or a dict/named-tuple key.

    By default: the tensor itself, the first element of a tuple, or the first value of a dict.
    """
    if isinstance(output, Tensor):
        if which not in (None, 0):
            raise InputError(f"output={which!r} selects from a tuple or dict, but the model returns one tensor")
        return output
    value = _pick(output, which)
    if not isinstance(value, Tensor):
        raise InputError(f"output {which!r} is {type(value).__name__}, expected a tensor")
    return value


def _pick(structure: Any, which: Selector) -> Any:
    """Element ``which`` of a dict, tuple, list or named tuple (first element by default)."""
    if isinstance(structure, Mapping):
        keys = list(structure)
        key = keys[0] if which is None and keys else which
        if key not in structure:
            raise InputError(f"output={which!r} is not among the model's outputs {keys}")
        return structure[key]
    if isinstance(structure, tuple | list) and structure:
        if isinstance(which, str):
            fields = getattr(structure, "_fields", ())
            if which not in fields:
                raise InputError(f"output={which!r} is not a field of the model's output; fields: {list(fields)}")
            return getattr(structure, which)
        index = 0 if which is None else which
        if not -len(structure) <= index < len(structure):
            raise InputError(f"output={which!r} is out of range: the model returns {len(structure)} outputs")
        return structure[index]
    raise InputError(f"the model returned {type(structure).__name__}; expected a tensor, a tuple or a dict of tensors")


def describe_structure(output: Any) -> dict[str, Any]:
    """A JSON-able description of an output: ``tensor``, ``tuple`` (length, fields) or ``dict`` (keys)."""
    if isinstance(output, Tensor):
        return {"type": "tensor"}
    if isinstance(output, Mapping):
        return {"type": "dict", "keys": [str(k) for k in output]}
    if isinstance(output, tuple | list):
        fields = list(getattr(output, "_fields", ()))
        return {"type": "tuple", "length": len(output), **({"fields": fields} if fields else {})}
    raise InputError(f"the model returned {type(output).__name__}; expected a tensor, a tuple or a dict of tensors")


def flatten_outputs(output: Any) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of a one-level output structure (names: dict keys, ``output_i``, ``output``)."""
    structure = describe_structure(output)
    if structure["type"] == "tensor":
        return ["output"], [output]
    if structure["type"] == "dict":
        return list(structure["keys"]), [select_output(output, k) for k in output]
    names = structure.get("fields") or [f"output_{i}" for i in range(len(output))]
    return names, [select_output(output, i) for i in range(len(output))]


# --------------------------------------------------------------------------- scores
def to_scores(values: Tensor, kind: str, task: str) -> Tensor:
    """Probabilities (classification ``(N, C)``, binary ``(N,)``) or values (regression), see module doc."""
    if task == "regression":
        return values
    if task == "sequence":  # per-frame log-probabilities (N, T, C), what the decoders read
        if values.dim() != 3:
            raise InputError(f"a sequence model returns (N, frames, classes) outputs; got {tuple(values.shape)}")
        to_log: dict[str, Callable[[Tensor, int], Tensor]] = {
            "logits": torch.log_softmax,
            "probabilities": _log,
            "log_probabilities": _keep,
        }
        return to_log[kind](values, -1)
    if task == "binary":
        if values.dim() == 2 and values.shape[1] == 2:
            return to_scores(values, kind, "classification")[:, 1]
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() != 1:
            raise InputError(f"a binary model returns (N,), (N, 1) or (N, 2) outputs; got {tuple(values.shape)}")
        squash: dict[str, Callable[[Tensor], Tensor]] = {
            "logits": torch.sigmoid,
            "probabilities": _same,
            "log_probabilities": torch.exp,
        }
        return squash[kind](values)
    if values.dim() != 2:
        raise InputError(f"a classification model returns (N, classes) outputs; got {tuple(values.shape)}")
    if kind == "logits":
        return torch.softmax(values, dim=1)
    return values if kind == "probabilities" else torch.exp(values)


def _same(values: Tensor) -> Tensor:
    return values


def _log(values: Tensor, dim: int) -> Tensor:
    return values.log()


def _keep(values: Tensor, dim: int) -> Tensor:
    return values


def check_output_kind(values: Tensor, kind: str, task: str, tolerance: float = 1e-3) -> str | None:
    """A message when ``values`` contradict ``kind`` (e.g. negative "probabilities"), else ``None``."""
    if task == "regression" or values.numel() == 0:
        return None
    values = values.detach().double()
    rows = values.dim() == 2 and values.shape[1] > 1 and task == "classification"
    low, high = float(values.min()), float(values.max())
    if kind == "probabilities":
        if low < -tolerance or high > 1 + tolerance:
            return f"declared output kind 'probabilities', but outputs range over [{low:.4g}, {high:.4g}], not [0, 1]"
        sums = values.sum(1) if rows else None
        if sums is not None and float((sums - 1).abs().max()) > tolerance:
            return (
                f"declared output kind 'probabilities', but rows sum to [{float(sums.min()):.4g}, "
                f"{float(sums.max()):.4g}], not 1"
            )
    elif kind == "log_probabilities":
        if high > tolerance:
            return f"declared output kind 'log_probabilities', but outputs reach {high:.4g} > 0"
        sums = values.exp().sum(1) if rows else None
        if sums is not None and float((sums - 1).abs().max()) > tolerance:
            return f"declared output kind 'log_probabilities', but exp(rows) sum to {float(sums.min()):.4g}.., not 1"
    elif rows and low >= 0 and high <= 1 and float((values.sum(1) - 1).abs().max()) <= 1e-4:
        return (
            "declared output kind 'logits', but outputs look like probabilities (rows in [0, 1] summing to 1): "
            "softmax would be applied twice; pass output_kind='probabilities'"
        )
    return None


# --------------------------------------------------------------------------- detection
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
        result = _pick(result, which)
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


# --------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class Head:
    """One served prediction: which output (``select``), its task, labels and output kind.

    A single-task model has one head named ``None``; ``heads={"digit": "classification", ...}``
    gives one head per named (dict key, named-tuple field) or indexed (tuple position) output.
    ``kind`` is ``None`` for regression (values are never transformed).
    """

    name: str | int | None
    select: Selector
    task: str
    labels: tuple[str, ...] | None = None
    kind: OutputKind | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "select": self.select,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "output_kind": self.kind.kind if self.kind else None,
            "output_kind_decided_by": self.kind.decided_by if self.kind else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Head:
        kind = data.get("output_kind")
        return cls(
            name=data.get("name"),
            select=data.get("select"),
            task=check_task(data["task"]),
            labels=tuple(data["labels"]) if data.get("labels") is not None else None,
            kind=OutputKind(check_kind(kind), data.get("output_kind_decided_by") or "recorded") if kind else None,
        )


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"task must be one of {list(TASKS)}; got {task!r}")
    return task


def resolve_heads(
    model: Any,
    task: str | None = "classification",
    labels: Any = None,
    output: Selector = None,
    heads: Mapping[Any, str] | None = None,
    output_kind: str | Mapping[Any, str] | None = None,
    example_inputs: Any = None,
) -> list[Head]:
    """The heads a model serves, each with its output kind declared or detected (model in eval mode).

    Without ``heads`` there is one head for output ``output`` with ``task`` and ``labels``; with
    ``heads`` (name -> task), ``labels`` and ``output_kind`` may be dicts keyed by head name.
    ``model`` may be any callable; kinds are detected only for ``nn.Module`` models.
    """
    if heads is None:
        plan = [(None, output, check_task(task or "classification"), labels, output_kind)]
    else:
        if not heads:
            raise InputError("heads must name at least one output, e.g. {'digit': 'classification'}")
        plan = [
            (name, name, check_task(t), _per_head(labels, name), _per_head(output_kind, name))
            for name, t in heads.items()
        ]
    return [_head(model, name, select, t, lab, kind, example_inputs) for name, select, t, lab, kind in plan]


def _per_head(value: Any, name: Any) -> Any:
    return value.get(name) if isinstance(value, Mapping) else value


def _head(model: Any, name: Any, select: Selector, task: str, labels: Any, kind: Any, example_inputs: Any) -> Head:
    labels = tuple(str(label) for label in labels) if labels is not None else None
    if task == "regression":
        decided = None
    elif kind is not None:
        decided = OutputKind(check_kind(kind), "declared by the caller")
    elif isinstance(model, nn.Module):
        decided = detect_output_kind(model, select, example_inputs)
    else:
        decided = OutputKind("logits", "default: not a torch module, cannot trace; assumed logits")
    return Head(name, select, task, labels, decided)
