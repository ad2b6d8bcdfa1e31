"""Rebuilding a recorded architecture (:mod:`trainfer.serve.architecture`) on the meta device: every
field validated against :mod:`~trainfer.serve.architecture_tables` and bounded (:data:`MAX_VALUES`,
:data:`MAX_LIST`, :data:`MAX_DEPTH`, :data:`MAX_NODES`), strings that reach code checked by
:mod:`~trainfer.serve.architecture_names`.
"""

from __future__ import annotations

import inspect
import operator
from collections import OrderedDict
from typing import Any, cast

import torch
from torch import fx, nn

from trainfer.errors import BundleError
from trainfer.serve.architecture_names import CODE_NAMES, identifier, module_path, path_part
from trainfer.serve.architecture_record import digest
from trainfer.serve.architecture_tables import (
    ATTRIBUTES,
    DTYPES,
    FUNCTION_NAMES,
    FUNCTIONS,
    KIND,
    MAX_INT,
    METHODS,
    MODULES,
    OPS,
)

__all__ = ["MAX_DEPTH", "MAX_LIST", "MAX_NODES", "MAX_VALUES", "rebuild"]


def rebuild(description: Any, source: str, input_shape: list[int] | None) -> fx.GraphModule:
    """The :class:`torch.fx.GraphModule` ``description`` describes, its tensors on the meta device.

    Every field is validated (:class:`~trainfer.errors.BundleError` naming it, what was found and
    what is allowed). Load the weights with ``load_state_dict(..., assign=True)``, then run
    :func:`~trainfer.serve.computation_check.check_computation` on the recorded ``input_shape``
    (required here) before the model computes anything real.

    No string of the description reaches the Python code fx generates unless it is proven to be a
    plain identifier (:func:`~trainfer.serve.architecture_names.identifier`): node names are chosen
    by fx from validated targets, the recorded ones serve only to connect the nodes; strings passed
    as argument values are emitted by fx through ``repr``.
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
        _install(root, module_path(path, f"{where}.modules"), _build_module(spec, f"{where}.modules", budget), where)
    for path, spec in attributes.items():
        _install_tensor(root, module_path(path, f"{where}.attributes"), spec, f"{where}.attributes.{path}")
    graph = _build_graph(data["nodes"], modules, attributes, f"{where}.nodes", budget)
    class_name = identifier(data["class_name"], f"{where}.class_name")
    try:
        module = fx.GraphModule(root, graph, class_name)
    except Exception as error:  # a graph that does not hold together (e.g. a dangling output)
        raise BundleError(f"{where}: not a valid graph: {error}") from None
    return module


# Limits of a description: a real deploy form stays far below them (digits_net: 20 nodes, a RepVGG-B0:
# ~100), and they bound the memory and time that reading one can cost. Loading costs ~0.1 to 2
# milliseconds of CPU per node (the computation check runs every node on the meta device; measured
# figures in docs/security.md), so MAX_NODES keeps a forged chain of nodes to seconds while
# leaving real models (a ResNet-152: ~500 nodes) far below it.
MAX_VALUES = 200_000  #: constant values (list items, arguments, modules) in one description
MAX_LIST = 4096  #: items in one list or tuple argument
MAX_DEPTH = 16  #: nesting of lists, tuples, dicts and Sequential modules
MAX_NODES = 4096  #: nodes in one description


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
                (path_part(key, f"{where}.children"), _build_module(child, f"{where}.children", budget, depth + 1))
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
    if not isinstance(nodes, list) or not nodes:
        raise BundleError(f"{where}: expected a list of 1 to {MAX_NODES} nodes")
    if len(nodes) > MAX_NODES:
        raise BundleError(f"{where}: {len(nodes)} nodes, over the limit of MAX_NODES = {MAX_NODES}")
    budget.spend(len(nodes))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for index, item in enumerate(nodes):
        here = f"{where}[{index}]"
        node = _mapping(item, here, {"name", "op", "target", "args", "kwargs"})
        name, op = node["name"], node["op"]
        if not isinstance(name, str) or not 0 < len(name) <= 200 or name in env:
            raise BundleError(f"{here}.name: expected a new name of 1 to 200 characters, found {repr(name)[:120]}")
        if op not in OPS:
            raise BundleError(f"{here}.op: {op!r:.60} is not one of {list(OPS)}")
        if (op == "output") != (index == len(nodes) - 1):
            raise BundleError(f"{here}.op: the output must be the last node, and only it")
        target = _node_target(op, node["target"], modules, attributes, f"{here}.target")
        args = tuple(_decode(arg, env, f"{here}.args", budget) for arg in _list(node["args"], f"{here}.args"))
        kwargs = {
            identifier(key, f"{here}.kwargs"): _decode(value, env, f"{here}.kwargs.{key}", budget)
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
        raise BundleError(f"{where}: arguments do not fit {FUNCTION_NAMES.get(id(function))}: {error}") from None
    bound.arguments.update(fixed)
    return function, bound.args, bound.kwargs


def _node_target(op: str, target: Any, modules: dict[str, Any], attributes: dict[str, Any], where: str) -> Any:
    allowed: Any = {"call_module": modules, "get_attr": attributes, "call_function": FUNCTIONS, "call_method": METHODS}
    if op in allowed and (not isinstance(target, str) or target not in allowed[op]):
        raise BundleError(f"{where}: {op} {target!r:.120} is not one of the allowed {sorted(allowed[op])[:50]}")
    if op == "call_function":
        return FUNCTIONS[target]
    if op == "placeholder":  # the parameter's name in the generated forward's signature
        return identifier(target, where, CODE_NAMES)
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
    if tag == "dtype" and isinstance(inner, str) and inner in DTYPES:
        return DTYPES[inner]
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if tag == "dict" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
        return {
            identifier(key, f"{where}.dict"): _decode(item, env, where, budget, depth + 1)
            for key, item in _list(inner, where)
        }
    raise BundleError(
        f"{where}: unknown or invalid tagged value {value!r:.200} (tags: node of an earlier node, tuple, slice, "
        f"dtype one of {sorted(DTYPES)}, float, dict)"
    )
