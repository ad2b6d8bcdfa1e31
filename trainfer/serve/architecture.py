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
import json
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn import functional as F

from trainfer.errors import BundleError

__all__ = ["FUNCTIONS", "KIND", "METHODS", "MODULES", "describe", "digest", "rebuild"]

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
_BATCH_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_INPLACE = ("inplace",)
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

#: The module types a described graph may hold, with the constructor arguments read from each.
MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "Conv3d": (nn.Conv3d, _CONV),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "BatchNorm1d": (nn.BatchNorm1d, _BATCH_NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _BATCH_NORM),
    "BatchNorm3d": (nn.BatchNorm3d, _BATCH_NORM),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
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
}
_FUNCTION_NAMES = {id(function): name for name, function in reversed(FUNCTIONS.items())}
#: The tensor attributes ``getattr`` may read.
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
#: The tensor methods a ``call_method`` node may call.
METHODS = frozenset(
    {
        "view", "reshape", "flatten", "size", "dim", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
        "expand", "chunk", "split", "mean", "sum", "amax", "add", "sub", "mul", "div", "relu", "sigmoid", "tanh",
        "softmax", "clamp", "float", "double", "type_as", "flip",
    }
)  # fmt: skip
_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_DTYPE_LIST = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPE_LIST}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_PART = r"([A-Za-z_][A-Za-z0-9_]{0,199}|[0-9]{1,9})"  # an attribute name, or a Sequential/ModuleList index
_CHILD = re.compile(f"^{_PART}$")
_PATH = re.compile(f"^{_PART}(\\.{_PART}){{0,63}}$")


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
    return name if _NAME.match(name) and name != "GraphModuleImpl" else "GraphModule"


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


def _describe_attribute(gm: fx.GraphModule, target: str) -> dict[str, str]:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._parameters:
        return {"kind": "parameter"}
    if name in owner._buffers and name not in owner._non_persistent_buffers_set:
        return {"kind": "buffer"}
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
def rebuild(description: Any, source: str) -> fx.GraphModule:
    """The :class:`torch.fx.GraphModule` ``description`` describes, its tensors on the meta device.

    Every field is validated (:class:`~trainfer.errors.BundleError` naming it, what was found and
    what is allowed). Load the weights with ``load_state_dict(..., assign=True)``.
    """
    where = f"{source}: architecture"
    data = _mapping(description, where, {"kind", "class_name", "modules", "attributes", "nodes", "sha256"})
    body = {key: value for key, value in data.items() if key != "sha256"}
    if data["sha256"] != digest(body):
        raise BundleError(f"{where}: does not match its sha256 (the description was edited or corrupted)")
    if data["kind"] != KIND:
        raise BundleError(f"{where}.kind: expected {KIND!r}, found {data['kind']!r}")
    root = nn.Module()
    for path, spec in _mapping(data["modules"], f"{where}.modules").items():
        _install(root, _path(path, f"{where}.modules"), _build_module(spec, f"{where}.modules.{path}"))
    for path, spec in _mapping(data["attributes"], f"{where}.attributes").items():
        _install_tensor(root, _path(path, f"{where}.attributes"), spec, f"{where}.attributes.{path}")
    graph = _build_graph(data["nodes"], data["modules"], data["attributes"], f"{where}.nodes")
    class_name = data["class_name"]
    if not isinstance(class_name, str) or not _NAME.match(class_name):
        raise BundleError(f"{where}.class_name: expected an identifier, found {class_name!r}")
    try:
        return fx.GraphModule(root, graph, class_name)
    except Exception as error:  # a graph that does not hold together (e.g. a dangling output)
        raise BundleError(f"{where}: not a valid graph: {error}") from None


def _mapping(value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{where}: expected an object, found {type(value).__name__}")
    if keys is not None and set(value) != keys:
        raise BundleError(f"{where}: expected the fields {sorted(keys)}, found {sorted(value)}")
    return value


def _path(path: str, where: str) -> str:
    if not _PATH.match(path):
        raise BundleError(f"{where}: {path!r} is not a dotted attribute path")
    for part in path.split("."):
        _not_reserved(part, where)
    return path


def _child_name(name: str, where: str) -> str:
    if not _CHILD.match(name):
        raise BundleError(f"{where}: {name!r} is not a submodule name (an identifier or an index, no dots)")
    return _not_reserved(name, where)


#: Names every ``nn.Module`` already has (``training``, ``forward``, ``__class__``, ...): not submodule names.
_RESERVED = frozenset(dir(nn.Module()))


def _not_reserved(name: str, where: str) -> str:
    if name in _RESERVED:
        raise BundleError(f"{where}: {name!r} names an attribute every nn.Module has: expected a submodule name")
    return name


def _build_module(spec: Any, where: str) -> nn.Module:
    spec = _mapping(spec, where)
    name = spec.get("type")
    if name not in MODULES:
        raise BundleError(f"{where}.type: {name!r} is not one of the allowed module types {sorted(MODULES)}")
    if name == "Sequential":
        children = _mapping(_mapping(spec, where, {"type", "children"})["children"], f"{where}.children")
        return nn.Sequential(
            OrderedDict(
                (_child_name(key, f"{where}.children"), _build_module(c, f"{where}.{key}"))
                for key, c in children.items()
            )
        )
    cls, allowed = MODULES[name]
    args = _mapping(_mapping(spec, where, {"type", "args"})["args"], f"{where}.args")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise BundleError(f"{where}.args: {unknown} are not arguments of {name} (allowed: {list(allowed)})")
    values = {key: _decode_constant(value, f"{where}.args.{key}") for key, value in args.items()}
    try:
        with torch.device("meta"):
            return cls(**values)
    except Exception as error:  # wrong argument values: the manifest's fault
        raise BundleError(f"{where}: {name}({values}) failed: {error}") from None


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    owner_path, _, name = path.rpartition(".")
    _owner(root, owner_path).add_module(name, module)


def _owner(root: nn.Module, path: str) -> nn.Module:
    owner = root
    for part in path.split(".") if path else ():
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = cast(nn.Module, owner._modules[part])  # never None: only _install and _owner add modules here
    return owner


def _install_tensor(root: nn.Module, path: str, spec: Any, where: str) -> None:
    kind = _mapping(spec, where, {"kind"})["kind"]
    owner_path, _, name = path.rpartition(".")
    owner = _owner(root, owner_path)
    empty = torch.empty(0, device="meta")
    if kind == "parameter":
        owner.register_parameter(name, nn.Parameter(empty, requires_grad=False))
    elif kind == "buffer":
        owner.register_buffer(name, empty)
    else:
        raise BundleError(f"{where}.kind: expected 'parameter' or 'buffer', found {kind!r}")


def _build_graph(nodes: Any, modules: dict[str, Any], attributes: dict[str, Any], where: str) -> fx.Graph:
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        raise BundleError(f"{where}: expected a list of 1 to {MAX_NODES} nodes")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for index, item in enumerate(nodes):
        here = f"{where}[{index}]"
        node = _mapping(item, here, {"name", "op", "target", "args", "kwargs"})
        name, op = node["name"], node["op"]
        if not isinstance(name, str) or not _NAME.match(name) or name in env:
            raise BundleError(f"{here}.name: expected a new identifier, found {name!r}")
        if op not in _OPS:
            raise BundleError(f"{here}.op: {op!r} is not one of {list(_OPS)}")
        target = _node_target(op, node["target"], modules, attributes, f"{here}.target")
        args = tuple(_decode(arg, env, f"{here}.args") for arg in _list(node["args"], f"{here}.args"))
        kwargs = {key: _decode(value, env, f"{here}.kwargs") for key, value in _mapping(node["kwargs"], here).items()}
        if target is getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
            raise BundleError(f"{here}: getattr may read only {sorted(ATTRIBUTES)}, found {args[1:]!r}")
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    if nodes[-1]["op"] != "output":
        raise BundleError(f"{where}: the last node must be the output, found {nodes[-1]['op']!r}")
    return graph


def _node_target(op: str, target: Any, modules: dict[str, Any], attributes: dict[str, Any], where: str) -> Any:
    allowed: Any = {"call_module": modules, "get_attr": attributes, "call_function": FUNCTIONS, "call_method": METHODS}
    if op in allowed and target not in allowed[op]:
        raise BundleError(f"{where}: {op} {target!r} is not one of the allowed {sorted(allowed[op])[:50]}")
    if op == "call_function":
        return FUNCTIONS[target]
    if not isinstance(target, str) or (op in ("placeholder", "output") and not _NAME.match(target)):
        raise BundleError(f"{where}: expected an identifier, found {target!r}")
    return target


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BundleError(f"{where}: expected a list, found {type(value).__name__}")
    return value


def _decode_constant(value: Any, where: str) -> Any:
    return _decode(value, {}, where)


def _decode(value: Any, env: dict[str, fx.Node], where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_decode(item, env, where) for item in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise BundleError(f"{where}: expected a JSON value or a tagged object, found {value!r:.200}")
    (tag, inner), = value.items()  # fmt: skip
    if tag == "node" and inner in env:
        return env[inner]
    if tag == "tuple" and isinstance(inner, list):
        return tuple(_decode(item, env, where) for item in inner)
    if tag == "slice" and isinstance(inner, list) and len(inner) == 3:
        return slice(*(_decode(item, env, where) for item in inner))
    if tag == "dtype" and inner in _DTYPES:
        return _DTYPES[inner]
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "dict" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
        return {str(key): _decode(item, env, where) for key, item in inner}
    raise BundleError(
        f"{where}: unknown or invalid tagged value {value!r:.200} (tags: node of an earlier node, tuple, slice, "
        f"dtype one of {sorted(_DTYPES)}, float, dict)"
    )
