"""A deploy form's architecture as declarative JSON: the folded ``torch.fx`` graph, without pickle or code.

:func:`describe` turns a :class:`torch.fx.GraphModule` into JSON values::

    {"kind": "fx-graph", "class_name": "DigitsNet",
     "modules": {"stage1.0.reparam": {"type": "Conv2d", "args": {"in_channels": 1, ...}}, ...},
     "attributes": {"scale": {"kind": "parameter"}},
     "nodes": [{"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}},
               {"name": "conv", "op": "call_module", "target": "stage1.0.reparam",
                "args": [{"node": "x"}], "kwargs": {}}, ...,
               {"name": "output", "op": "output", "target": "output", "args": [{"node": "fc"}], "kwargs": {}}],
     "sha256": "..."}

Every ``call_module`` target is a module of :data:`MODULES` (``torch.nn`` types; ``Sequential``
holding them) with the constructor arguments read from the module; ``call_function`` targets come
from :data:`FUNCTIONS` (``operator``, ``torch`` and ``torch.nn.functional`` names) and
``call_method`` targets from :data:`METHODS`. Arguments are JSON values, with tagged objects for
what JSON lacks: ``{"node": name}``, ``{"tuple": [...]}``, ``{"slice": [a, b, c]}``,
``{"dtype": "float32"}``, ``{"float": "inf"}``, ``{"dict": [[key, value], ...]}``.

:func:`rebuild` validates every field against those tables (anything else is a
:class:`~trainfer.errors.BundleError` naming what was found and what is allowed; nothing outside
the tables is ever imported or called) and builds the module on the meta device: its weights come
from the bundle's safetensors file, loaded by the caller with ``assign=True``. ``sha256`` (of the
canonical JSON of the other fields) catches an edited or corrupted description; it is no signature:
whoever can write the manifest can write a matching digest, and still only allow-listed types and
functions are ever built or called.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import keyword
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from trainfer.errors import BundleError

__all__ = ["FUNCTIONS", "KIND", "METHODS", "MODULES", "check_computation", "describe", "digest", "rebuild"]

KIND = "fx-graph"
MAX_NODES = 100_000
_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
_BATCH_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats", "bias")
_INPLACE = ("inplace",)
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

#: The module types a described graph may hold, with the constructor arguments read from each (in the
#: order of torch's signatures; tests/test_architecture.py checks them against the installed torch).
MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "Conv3d": (nn.Conv3d, _CONV),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "BatchNorm1d": (nn.BatchNorm1d, _BATCH_NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _BATCH_NORM),
    "BatchNorm3d": (nn.BatchNorm3d, _BATCH_NORM),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine", "bias")),
    "ReLU": (nn.ReLU, _INPLACE),
    "ReLU6": (nn.ReLU6, _INPLACE),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, _INPLACE),
    "Mish": (nn.Mish, _INPLACE),
    "Hardswish": (nn.Hardswish, _INPLACE),
    "Hardsigmoid": (nn.Hardsigmoid, _INPLACE),
    "ELU": (nn.ELU, ("alpha", "inplace")),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "Identity": (nn.Identity, ()),
    "MaxPool1d": (nn.MaxPool1d, _MAX_POOL),
    "MaxPool2d": (nn.MaxPool2d, _MAX_POOL),
    "AvgPool1d": (nn.AvgPool1d, _AVG_POOL[:-1]),
    "AvgPool2d": (nn.AvgPool2d, _AVG_POOL),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, ("p", "inplace")),
    "Sequential": (nn.Sequential, ()),
}
_TYPE_NAMES = {cls: name for name, (cls, _) in MODULES.items()}

_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "neg", "matmul", "pow", "getitem", "iadd", "imul")
_TORCH = (
    "add", "sub", "mul", "div", "cat", "stack", "flatten", "reshape", "permute", "transpose", "squeeze", "unsqueeze",
    "chunk", "split", "mean", "sum", "amax", "matmul", "clamp", "relu", "sigmoid", "tanh", "softmax", "exp", "sqrt",
    "neg", "conv2d", "addmm", "batch_norm",
)  # fmt: skip
_FUNCTIONAL = (
    "relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
    "softmax", "log_softmax", "conv1d", "conv2d", "linear", "batch_norm", "layer_norm", "group_norm", "avg_pool2d",
    "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "pad", "interpolate", "normalize",
)  # fmt: skip

#: The functions a ``call_function`` node may name (``getattr`` only for :data:`ATTRIBUTES`).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{name}": getattr(operator, name) for name in _OPERATORS},
    **{f"torch.{name}": getattr(torch, name) for name in _TORCH},
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in _FUNCTIONAL},
    "getattr": getattr,
    "collections.OrderedDict": OrderedDict,  # a model's OrderedDict output, rebuilt as its own type by the fold
}
_FUNCTION_NAMES = {id(function): name for name, function in reversed(FUNCTIONS.items())}
#: The tensor attributes ``getattr`` may read.
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
#: The tensor methods a ``call_method`` node may call.
METHODS = frozenset(
    {
        "view", "reshape", "flatten", "size", "dim", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
        "expand", "chunk", "split", "mean", "sum", "amax", "add", "sub", "mul", "div", "relu", "sigmoid", "tanh",
        "softmax", "log_softmax", "clamp", "float", "double", "type_as", "flip",
    }
)  # fmt: skip
_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_DTYPE_LIST = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPE_LIST}


# --------------------------------------------------------------------------- describe (save)
def describe(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON description of ``gm`` (see the module docstring); refuses what the tables lack.

    Raises :class:`~trainfer.errors.BundleError` naming the first module type, function, method or
    argument that cannot be described.
    """
    modules: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            modules[node.target] = _describe_module(gm.get_submodule(node.target), node.target)
        elif node.op == "get_attr":
            attributes[node.target] = _describe_attribute(gm, node.target)
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": _describe_target(node),
                "args": [_encode(arg) for arg in node.args],
                "kwargs": {key: _encode(value) for key, value in node.kwargs.items()},
            }
        )
    description: dict[str, Any] = {
        "kind": KIND,
        "class_name": _class_name(gm),
        "modules": modules,
        "attributes": attributes,
    }
    description["nodes"] = nodes
    return {**description, "sha256": digest(description)}


def digest(description: dict[str, Any]) -> str:
    """The sha256 of ``description``'s canonical JSON: catches a hand-edited or corrupted architecture."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _class_name(gm: fx.GraphModule) -> str:
    name = type(gm).__name__
    plain = _IDENTIFIER.fullmatch(name) and not keyword.iskeyword(name) and not name.startswith("__")
    return name if plain and name != "GraphModuleImpl" else "GraphModule"


def _describe_module(module: nn.Module, path: str) -> dict[str, Any]:
    name = _TYPE_NAMES.get(type(module))
    if name is None:
        raise BundleError(
            f"cannot record the architecture: module {path!r} is a {type(module).__module__}.{type(module).__name__}, "
            f"not one of the allowed types {sorted(MODULES)}"
        )
    if name == "Sequential":
        return {"type": name, "children": {key: _describe_module(child, f"{path}.{key}") for key, child in
                                           module.named_children()}}  # fmt: skip
    return {"type": name, "args": {arg: _encode(_constructor_value(module, arg)) for arg in MODULES[name][1]}}


def _constructor_value(module: nn.Module, arg: str) -> Any:
    if arg == "bias" and not isinstance(getattr(module, "bias", None), bool):
        return module.bias is not None
    return getattr(module, arg)


def _describe_attribute(gm: fx.GraphModule, target: str) -> dict[str, Any]:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._parameters:
        return {"kind": "parameter", "shape": list(cast(torch.Tensor, owner._parameters[name]).shape)}
    if name in owner._buffers and name not in owner._non_persistent_buffers_set:
        return {"kind": "buffer", "shape": list(cast(torch.Tensor, owner._buffers[name]).shape)}
    raise BundleError(f"cannot record the architecture: {target!r} is not a parameter or persistent buffer")


def _describe_target(node: fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    name = _FUNCTION_NAMES.get(id(node.target))
    if name is None:
        raise BundleError(
            f"cannot record the architecture: node {node.name!r} calls {node.target!r}, "
            f"not one of the allowed functions {sorted(FUNCTIONS)}"
        )
    return name


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item) for item in value]}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in _DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": [[key, _encode(item)] for key, item in value.items()]}
    raise BundleError(f"cannot record the architecture: argument {value!r} ({type(value).__name__}) has no JSON form")


# --------------------------------------------------------------------------- rebuild (load)
def rebuild(description: Any, source: str, input_shape: list[int] | None) -> fx.GraphModule:
    """The :class:`torch.fx.GraphModule` ``description`` describes, its tensors on the meta device.

    Every field is validated (:class:`~trainfer.errors.BundleError` naming it, what was found and
    what is allowed). Load the weights with ``load_state_dict(..., assign=True)``, then run
    :func:`check_computation` on the recorded ``input_shape`` (required here) before the model
    computes anything real.

    No string of the description reaches the Python code fx generates unless it is proven to be a
    plain identifier (:func:`_identifier`): node names are chosen by fx from validated targets, the
    recorded ones serve only to connect the nodes; strings passed as argument values are emitted by
    fx through ``repr``.
    """
    where = f"{source}: architecture"
    data = _mapping(description, where, {"kind", "class_name", "modules", "attributes", "nodes", "sha256"})
    body = {key: value for key, value in data.items() if key != "sha256"}
    if data["sha256"] != digest(body):
        raise BundleError(f"{where}: does not match its sha256 (the description was edited or corrupted)")
    if data["kind"] != KIND:
        raise BundleError(f"{where}.kind: expected {KIND!r}, found {data['kind']!r}")
    if input_shape is None:
        raise BundleError(f"{source}: input.shape: a recorded architecture needs the example input shape (found null)")
    budget = _Budget(f"{where}")
    root = nn.Module()
    modules = _mapping(data["modules"], f"{where}.modules")
    attributes = _mapping(data["attributes"], f"{where}.attributes")
    budget.spend(len(modules) + len(attributes))
    for path, spec in modules.items():
        _install(root, _path(path, f"{where}.modules"), _build_module(spec, f"{where}.modules", budget), where)
    for path, spec in attributes.items():
        _install_tensor(root, _path(path, f"{where}.attributes"), spec, f"{where}.attributes.{path}")
    graph = _build_graph(data["nodes"], modules, attributes, f"{where}.nodes", budget)
    class_name = _identifier(data["class_name"], f"{where}.class_name")
    try:
        module = fx.GraphModule(root, graph, class_name)
    except Exception as error:  # a graph that does not hold together (e.g. a dangling output)
        raise BundleError(f"{where}: not a valid graph: {error}") from None
    return module


# Limits of a description: a real deploy form stays far below them (digits_net: 20 nodes, a RepVGG-B0:
# ~100), and they bound the memory and time that reading one can cost.
MAX_VALUES = 200_000  #: constant values (list items, arguments, modules) in one description
MAX_LIST = 4096  #: items in one list or tuple argument
MAX_DEPTH = 16  #: nesting of lists, tuples, dicts and Sequential modules
MAX_INT = 2**62  #: magnitude of an integer, in the description and computed by a Python operator
MAX_EXPONENT = 64  #: magnitude of a Python ``**`` exponent
MAX_GROWTH = 1024  #: a tensor the graph computes holds at most this many times the input's elements...
MIN_ELEMENTS_LIMIT = 2**24  #: ...or this many, whichever is larger,
MAX_ELEMENTS_LIMIT = 2**30  #: and never more than this (on the recorded example input);
MAX_TOTAL_FACTOR = 16  #: all the tensors it computes hold at most this many times that limit.
FLOPS_PER_WEIGHT = 8  #: floating-point operations per weight (and input element) per input element...
MIN_FLOPS = 2**30  #: ...or this many, whichever is larger,
MAX_FLOPS = 10**12  #: and never more than this (on the recorded example input).

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_INDEX = re.compile(r"[0-9]{1,9}")
#: Names an ``nn.Module``/``GraphModule`` already uses: a child or tensor of that name would shadow them.
_MODULE_NAMES = frozenset(dir(fx.GraphModule)) | frozenset(vars(nn.Module()))
#: A name fx's generated ``forward`` takes itself (a parameter shadowing a global it uses, ``torch``
#: say, is caught when :func:`check_computation` runs that code).
_CODE_NAMES = frozenset({"self"})


def _identifier(value: Any, where: str, reserved: frozenset[str] = frozenset()) -> str:
    """``value`` if it is a plain ASCII identifier (``fullmatch``: no trailing newline), not a keyword,
    not a dunder and not ``reserved``: the only strings fx may paste into the code it generates."""
    if (
        not isinstance(value, str)
        or not _IDENTIFIER.fullmatch(value)
        or keyword.iskeyword(value)
        or value.startswith("__")
        or value in reserved
    ):
        shown = repr(value)[:120]
        extra = f", not one of {sorted(reserved)[:8]}{' ...' if len(reserved) > 8 else ''}" if reserved else ""
        raise BundleError(f"{where}: expected a plain identifier (ASCII, no keyword, no dunder{extra}), found {shown}")
    return value


def _part(part: str, where: str) -> str:
    """One part of a module or tensor path: an identifier that shadows nothing, or a container index."""
    return part if _INDEX.fullmatch(part) else _identifier(part, where, _MODULE_NAMES)


def _path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= 2000 or path.count(".") > 63:
        raise BundleError(f"{where}: expected a dotted path of at most 64 names, found {repr(path)[:120]}")
    for part in path.split("."):
        _part(part, f"{where}: {path[:120]!r}")
    return path


class _Budget:
    """Counts the constant values decoded from one description (at most :data:`MAX_VALUES`)."""

    def __init__(self, where: str) -> None:
        self.where, self.left = where, MAX_VALUES

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise BundleError(f"{self.where}: more than {MAX_VALUES} values: not a deploy form trainfer writes")


def _mapping(value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{where}: expected an object, found {type(value).__name__}")
    if keys is not None and set(value) != keys:
        raise BundleError(f"{where}: expected the fields {sorted(keys)}, found {sorted(value)[:20]}")
    return value


def _build_module(spec: Any, where: str, budget: _Budget, depth: int = 0) -> nn.Module:
    spec = _mapping(spec, where)
    name = spec.get("type")
    if not isinstance(name, str) or name not in MODULES:
        raise BundleError(f"{where}.type: {name!r:.120} is not one of the allowed module types {sorted(MODULES)}")
    if name == "Sequential":
        if depth >= MAX_DEPTH:
            raise BundleError(f"{where}: Sequential modules nested deeper than {MAX_DEPTH}")
        children = _mapping(_mapping(spec, where, {"type", "children"})["children"], f"{where}.children")
        budget.spend(len(children))
        return nn.Sequential(
            OrderedDict(
                (_part(key, f"{where}.children"), _build_module(child, f"{where}.children", budget, depth + 1))
                for key, child in children.items()
            )
        )
    cls, allowed = MODULES[name]
    args = _mapping(_mapping(spec, where, {"type", "args"})["args"], f"{where}.args")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise BundleError(f"{where}.args: {unknown[:20]} are not arguments of {name} (allowed: {list(allowed)})")
    values = {key: _decode(value, {}, f"{where}.args.{key}", budget) for key, value in args.items()}
    if "inplace" in values:  # a served form never writes into its input (the caller's array)
        values["inplace"] = False
    try:
        with torch.device("meta"):
            module = cls(**values)
    except Exception as error:  # wrong argument values: the manifest's fault
        raise BundleError(f"{where}: {name}({values}) failed: {error}") from None
    _check_constructed(module, name, where)
    return module


def _check_constructed(module: nn.Module, name: str, where: str) -> None:
    """Arguments torch accepts at construction but that would fail (or mislead) only in forward."""
    dim = getattr(module, "dim", None)
    if name == "Softmax" and dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
        raise BundleError(f"{where}: Softmax dim must be an integer, found {dim!r:.60}")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        raise BundleError(
            f"{where}: a {name} without running statistics normalises each batch by its own statistics: "
            "not an inference form (one sample's answer would depend on the others in its batch)"
        )


def _install(root: nn.Module, path: str, module: nn.Module, where: str) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = _owner(root, owner_path, where)
    if name in owner._modules or name in owner._parameters or name in owner._buffers:
        raise BundleError(f"{where}: {path!r} is declared twice")
    owner.add_module(name, module)


def _owner(root: nn.Module, path: str, where: str) -> nn.Module:
    owner = root
    for part in path.split(".") if path else ():
        if part in owner._parameters or part in owner._buffers:
            raise BundleError(f"{where}: {path!r} passes through the tensor {part!r}")
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = cast(nn.Module, owner._modules[part])  # never None: only _install and _owner add modules here
    return owner


def _install_tensor(root: nn.Module, path: str, spec: Any, where: str) -> None:
    """A parameter or buffer of the recorded ``shape`` on the meta device (its values come with the weights)."""
    spec = _mapping(spec, where)
    if not {"kind"} <= set(spec) <= {"kind", "shape"}:
        raise BundleError(f"{where}: expected the fields ['kind', 'shape'], found {sorted(spec)[:20]}")
    kind, shape = spec["kind"], spec.get("shape", [0])
    dims = isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d <= 2**31 for d in shape)
    if not dims:
        raise BundleError(f"{where}.shape: expected at most 8 sizes from 0 to 2**31, found {shape!r:.120}")
    owner_path, _, name = path.rpartition(".")
    owner = _owner(root, owner_path, where)
    if name in owner._modules or name in owner._parameters or name in owner._buffers:
        raise BundleError(f"{where}: {path!r} is declared twice")
    empty = torch.empty(shape, device="meta")
    if kind == "parameter":
        owner.register_parameter(name, nn.Parameter(empty, requires_grad=False))
    elif kind == "buffer":
        owner.register_buffer(name, empty)
    else:
        raise BundleError(f"{where}.kind: expected 'parameter' or 'buffer', found {kind!r:.60}")


def _build_graph(
    nodes: Any, modules: dict[str, Any], attributes: dict[str, Any], where: str, budget: _Budget
) -> fx.Graph:
    """The graph of ``nodes``. fx names every node from its (validated) target; a node's recorded
    ``name`` only says which node a later ``{"node": name}`` argument means."""
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        raise BundleError(f"{where}: expected a list of 1 to {MAX_NODES} nodes")
    budget.spend(len(nodes))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for index, item in enumerate(nodes):
        here = f"{where}[{index}]"
        node = _mapping(item, here, {"name", "op", "target", "args", "kwargs"})
        name, op = node["name"], node["op"]
        if not isinstance(name, str) or not 0 < len(name) <= 200 or name in env:
            raise BundleError(f"{here}.name: expected a new name of 1 to 200 characters, found {repr(name)[:120]}")
        if op not in _OPS:
            raise BundleError(f"{here}.op: {op!r:.60} is not one of {list(_OPS)}")
        if (op == "output") != (index == len(nodes) - 1):
            raise BundleError(f"{here}.op: the output must be the last node, and only it")
        target = _node_target(op, node["target"], modules, attributes, f"{here}.target")
        args = tuple(_decode(arg, env, f"{here}.args", budget) for arg in _list(node["args"], f"{here}.args"))
        kwargs = {
            _identifier(key, f"{here}.kwargs"): _decode(value, env, f"{here}.kwargs.{key}", budget)
            for key, value in _mapping(node["kwargs"], f"{here}.kwargs").items()
        }
        if op == "call_method" and not (args and isinstance(args[0], fx.Node)):
            raise BundleError(f"{here}.args: a method is called on an earlier node, found {args[:1]!r:.120}")
        if target is getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
            raise BundleError(f"{here}: getattr may read only {sorted(ATTRIBUTES)}, found {args[1:]!r:.120}")
        if op == "call_function":
            target, args, kwargs = _inference_call(target, args, kwargs, here)
        env[name] = graph.create_node(op, target, args, kwargs)
    return graph


#: In-place Python operators, rebuilt as their plain forms: the same value, and a served form never
#: writes into a tensor it did not make (the caller's input array, shared without a copy).
_NOT_IN_PLACE: dict[Any, Any] = {operator.iadd: operator.add, operator.imul: operator.mul}
#: Keyword arguments fixed for inference whatever the description says: no in-place writes, no
#: dropout or batch statistics (what training does).
_INFERENCE_KEYWORDS = {"inplace": False, "training": False}


def _inference_call(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> tuple[Any, ...]:
    """``function(*args, **kwargs)`` as inference computes it: see :data:`_NOT_IN_PLACE` and
    :data:`_INFERENCE_KEYWORDS` (arguments bound by name through the function's signature)."""
    function = _NOT_IN_PLACE.get(function, function)
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature (torch.add, ...) takes no such flags
        return function, args, kwargs
    fixed = {key: value for key, value in _INFERENCE_KEYWORDS.items() if key in parameters}
    if not fixed:
        return function, args, kwargs
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise BundleError(f"{where}: arguments do not fit {_FUNCTION_NAMES.get(id(function))}: {error}") from None
    bound.arguments.update(fixed)
    return function, bound.args, bound.kwargs


def _node_target(op: str, target: Any, modules: dict[str, Any], attributes: dict[str, Any], where: str) -> Any:
    allowed: Any = {"call_module": modules, "get_attr": attributes, "call_function": FUNCTIONS, "call_method": METHODS}
    if op in allowed and (not isinstance(target, str) or target not in allowed[op]):
        raise BundleError(f"{where}: {op} {target!r:.120} is not one of the allowed {sorted(allowed[op])[:50]}")
    if op == "call_function":
        return FUNCTIONS[target]
    if op == "placeholder":  # the parameter's name in the generated forward's signature
        return _identifier(target, where, _CODE_NAMES)
    if op == "output":
        return "output"
    return target  # a validated module/tensor path, or a method of METHODS


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BundleError(f"{where}: expected a list, found {type(value).__name__}")
    if len(value) > MAX_LIST:
        raise BundleError(f"{where}: a list of {len(value)} items, over the limit of {MAX_LIST}")
    return value


def _decode(value: Any, env: dict[str, fx.Node], where: str, budget: _Budget, depth: int = 0) -> Any:
    budget.spend(1)
    if depth > MAX_DEPTH:
        raise BundleError(f"{where}: values nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise BundleError(f"{where}: the integer {value:.3g} is over the limit of 2**62 in magnitude")
        return value
    if isinstance(value, str):
        if len(value) > 200:
            raise BundleError(f"{where}: a string of {len(value)} characters, over the limit of 200")
        return value
    if isinstance(value, list):
        return [_decode(item, env, where, budget, depth + 1) for item in _list(value, where)]
    if not isinstance(value, dict) or len(value) != 1:
        raise BundleError(f"{where}: expected a JSON value or a tagged object, found {value!r:.200}")
    (tag, inner), = value.items()  # fmt: skip
    if tag == "node" and isinstance(inner, str) and inner in env:
        return env[inner]
    if tag == "tuple" and isinstance(inner, list):
        return tuple(_decode(item, env, where, budget, depth + 1) for item in _list(inner, where))
    if tag == "slice" and isinstance(inner, list) and len(inner) == 3:
        return slice(*(_decode(item, env, where, budget, depth + 1) for item in inner))
    if tag == "dtype" and isinstance(inner, str) and inner in _DTYPES:
        return _DTYPES[inner]
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "dict" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
        return {
            _identifier(key, f"{where}.dict"): _decode(item, env, where, budget, depth + 1)
            for key, item in _list(inner, where)
        }
    raise BundleError(
        f"{where}: unknown or invalid tagged value {value!r:.200} (tags: node of an earlier node, tuple, slice, "
        f"dtype one of {sorted(_DTYPES)}, float, dict)"
    )


# --------------------------------------------------------------------------- what a graph may compute
_PYTHON_OPERATORS = frozenset(FUNCTIONS[f"operator.{name}"] for name in _OPERATORS if name != "getitem")
_NUMBER = (bool, int, float)
_SOFTMAXES = frozenset(
    {("call_function", F.softmax), ("call_function", F.log_softmax), ("call_function", torch.softmax)}
    | {("call_method", "softmax"), ("call_method", "log_softmax")}
)


def check_computation(gm: fx.GraphModule, input_shape: list[int] | None, where: str) -> Any:
    """Run ``gm`` (its weights loaded) once on the meta device (no memory, no arithmetic) on an input of
    ``input_shape`` in its weights' dtype; return the output's meta tensors, or refuse
    (:class:`~trainfer.errors.BundleError`) a graph that computes more than an inference form:

    - Python operators (``operator.add``, ``mul``, ``pow``, ...) take tensors or numbers, never
      sequences or strings (``[0] * 3e8`` repeats a list); integers they compute stay within
      :data:`MAX_INT`, and a ``**`` between numbers has an exponent of at most :data:`MAX_EXPONENT`;
    - a method is called on a tensor; a softmax runs over a dimension its input has;
    - memory: no tensor the graph computes holds more than ``L = max(MAX_GROWTH * input elements,
      MIN_ELEMENTS_LIMIT)`` elements, capped at :data:`MAX_ELEMENTS_LIMIT` (a pad of 30000 per side,
      an ``interpolate`` by 1e5, an ``expand`` to 1e15 elements), and all of them together at most
      ``MAX_TOTAL_FACTOR * L`` (forty such tensors kept alive for one ``cat``);
    - time: its floating-point operations (``torch.utils.flop_counter``: matmuls, convolutions, ...)
      stay within ``max(FLOPS_PER_WEIGHT * (weights + input elements) * input elements, MIN_FLOPS)``,
      capped at :data:`MAX_FLOPS`: the work of a network of that many weights on that input (a chain of
      4096x4096 matmuls on an 8x8 image is not);
    - the graph runs, through the interpreter and through the code fx generated for it: shapes agree,
      no division by zero, no parameter shadows a name the code uses.
    """
    if input_shape is None:
        raise BundleError(f"{where}: a recorded architecture needs the example input shape (input.shape is null)")
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise BundleError(f"{where}: a recorded architecture takes one input, found {len(placeholders)} placeholders")
    elements = math.prod(input_shape)
    weights = sum(t.numel() for t in gm.state_dict().values())
    limit = min(max(MAX_GROWTH * elements, MIN_ELEMENTS_LIMIT), MAX_ELEMENTS_LIMIT)
    flops = min(max(FLOPS_PER_WEIGHT * (weights + elements) * elements, MIN_FLOPS), MAX_FLOPS)
    meta = {name: torch.empty_like(t, device="meta") for name, t in gm.state_dict(keep_vars=True).items()}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.float32)  # the weights' own
    example = torch.empty(input_shape, device="meta", dtype=dtype)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            output = functional_call(_Checked(gm, limit), {f"gm.{k}": v for k, v in meta.items()}, (example,))
            functional_call(gm, meta, (example,))  # the code fx generated, on the same input
    except BundleError as error:  # the interpreter appends where it was: the first line says what
        raise BundleError(f"{where}: {str(error.args[0]).splitlines()[0]}") from None
    except Exception as error:  # a graph that does not run on its own example input: the manifest's fault
        raise BundleError(
            f"{where}: does not run on the recorded input shape {list(input_shape)}: {type(error).__name__}: "
            f"{str(error)[:300]}"
        ) from None
    if counter.get_total_flops() > flops:
        raise BundleError(
            f"{where}: computes {counter.get_total_flops():.3g} floating-point operations on its example input, over "
            f"the limit of {flops:.3g} for {weights} weights and {elements} input elements"
        )
    return output


class _Checked(nn.Module):
    """``gm`` run by :class:`_BoundedRun` (a module, so that ``functional_call`` swaps in meta weights)."""

    def __init__(self, gm: fx.GraphModule, limit: int) -> None:
        super().__init__()
        self.gm, self.limit = gm, limit

    def forward(self, x: torch.Tensor) -> Any:
        return _BoundedRun(self.gm, self.limit).run(x)


class _BoundedRun(fx.Interpreter):
    """An interpreter that checks each node's operands before it runs and its result after."""

    def __init__(self, gm: fx.GraphModule, limit: int) -> None:
        super().__init__(gm)
        self.limit, self.total = limit, 0

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in _PYTHON_OPERATORS:
            _check_operands(n, [self.env[a] if isinstance(a, fx.Node) else a for a in n.args])
        if n.op == "call_method" and not isinstance(self.env[cast(fx.Node, n.args[0])], torch.Tensor):
            raise BundleError(f"node {n.name!r}: method {n.target!r} is called on a non-tensor")
        self._check_softmax_dim(n)
        result = super().run_node(n)
        self._check_result(n, result)
        return result

    def _check_softmax_dim(self, n: fx.Node) -> None:
        """PyTorch's meta kernels of softmax accept any ``dim``: refuse one outside the input's dimensions."""
        dim: Any
        if n.op == "call_module" and isinstance(self.module.get_submodule(cast(str, n.target)), nn.Softmax):
            dim = self.module.get_submodule(cast(str, n.target)).dim
        elif (n.op, n.target) in _SOFTMAXES:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        else:
            return
        given = self.env.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if isinstance(given, torch.Tensor) and isinstance(dim, int) and not -given.dim() <= dim < max(given.dim(), 1):
            raise BundleError(f"node {n.name!r}: softmax over dim {dim} of a {given.dim()}-dimensional tensor")

    def _check_result(self, n: fx.Node, result: Any) -> None:
        for item in result if isinstance(result, tuple | list) else (result,):
            if isinstance(item, torch.Tensor) and item.numel() > self.limit:
                raise BundleError(
                    f"node {n.name!r} ({_shown(n)}) computes a tensor of {item.numel()} elements on the example "
                    f"input, over the limit of {self.limit}"
                )
            if isinstance(item, torch.Tensor):
                self.total += item.numel()
                if self.total > MAX_TOTAL_FACTOR * self.limit:
                    raise BundleError(
                        f"node {n.name!r} ({_shown(n)}): the graph's tensors hold more than {MAX_TOTAL_FACTOR} x "
                        f"{self.limit} elements in all on the example input"
                    )
            if isinstance(item, int) and abs(item) > MAX_INT:
                raise BundleError(f"node {n.name!r} ({_shown(n)}) computes an integer over 2**62 in magnitude")


def _shown(n: fx.Node) -> str:
    """What node ``n`` calls, as the description names it."""
    return _FUNCTION_NAMES.get(id(n.target), str(n.target))


def _check_operands(n: fx.Node, operands: list[Any]) -> None:
    for operand in operands:
        if not isinstance(operand, (torch.Tensor, *_NUMBER)):
            raise BundleError(f"node {n.name!r}: {_shown(n)} takes tensors or numbers, found {type(operand).__name__}")
    if n.target is operator.pow and all(isinstance(o, _NUMBER) for o in operands):
        exponent = operands[1] if len(operands) > 1 else 0
        if abs(exponent) > MAX_EXPONENT:
            raise BundleError(
                f"node {n.name!r}: a power of numbers with the exponent {exponent!r:.40} (limit {MAX_EXPONENT})"
            )
