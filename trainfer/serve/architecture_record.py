"""Recording a deploy form's architecture: a :class:`torch.fx.GraphModule` as JSON values (the format is
described in :mod:`trainfer.serve.architecture`), refusing what :mod:`~trainfer.serve.architecture_tables`
lacks; :func:`digest` of the description.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
from typing import Any, cast

import torch
from torch import fx, nn

from trainfer.errors import BundleError
from trainfer.serve.architecture_names import IDENTIFIER
from trainfer.serve.architecture_tables import DTYPES, FUNCTION_NAMES, FUNCTIONS, KIND, MODULES, TYPE_NAMES

__all__ = ["describe", "digest"]


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
    plain = IDENTIFIER.fullmatch(name) and not keyword.iskeyword(name) and not name.startswith("__")
    return name if plain and name != "GraphModuleImpl" else "GraphModule"


def _describe_module(module: nn.Module, path: str) -> dict[str, Any]:
    name = TYPE_NAMES.get(type(module))
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
    name = FUNCTION_NAMES.get(id(node.target))
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
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": [[key, _encode(item)] for key, item in value.items()]}
    raise BundleError(f"cannot record the architecture: argument {value!r} ({type(value).__name__}) has no JSON form")
