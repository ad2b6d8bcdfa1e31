"""What each node of a folded graph does to channels (dimension 1 of its 2-D or 4-D float value).

:func:`classify` gives every node a :class:`Role`:

- ``layer``: an ``nn.Conv2d`` (4-D input) or ``nn.Linear`` (2-D input), called once, that mixes
  channels: it reads its input channels through its weights (a removed constant input channel is
  absorbed into its bias) and makes each output channel with one filter (a filter can be dropped);
  grouped convolutions are layers too (removal keeps every group the same width);
- ``channelwise``: output channel ``c`` depends only on channel ``c`` of each data input, all of
  the output's width: activations, BatchNorm, pools, a depthwise conv (one filter per channel),
  dropout and identity, ``+``/``-``/``*`` of same-shaped tensors or with a Python number, a mean
  over the spatial dimensions;
- ``cat``: ``torch.cat`` along dimension 1;
- ``flatten``: a 4-D value flattened from dimension 1 (channel ``c`` becomes the ``H*W`` features
  from ``c*H*W``), by ``nn.Flatten``, ``torch.flatten``/``.flatten`` or ``.view``/``.reshape(n, -1)``;
- ``size0``: ``x.size(0)`` (reads no channel);
- ``barrier``: anything else; its inputs keep every channel, and nothing is known of its output.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam.fold.shapes import shape

__all__ = ["MONOTONE_FUNCTIONS", "MONOTONE_METHODS", "MONOTONE_MODULES", "Role", "classify", "width"]

#: Modules and functions applied channel by channel that never decrease (bounds map through them).
MONOTONE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)
MONOTONE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.hardtanh, F.sigmoid, torch.sigmoid,
                      F.hardsigmoid, torch.tanh, F.tanh, torch.clamp)  # fmt: skip
MONOTONE_METHODS = ("relu", "sigmoid", "tanh", "clamp")
#: Channel-wise activations that are not monotone: a constant maps to a constant, bounds are lost.
OTHER_MODULES = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)
OTHER_FUNCTIONS = (F.gelu, F.silu, F.mish, F.hardswish)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
_BINARY = (operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.sub, torch.mul)
_BINARY_METHODS = ("add", "sub", "mul")
_SPATIAL = {(2, 3), (-2, -1), (-1, -2), (3, 2)}


@dataclass
class Role:
    """What ``node`` does to channels: ``kind`` (see the module docstring) and its data inputs."""

    kind: str
    inputs: list[Any] = field(default_factory=list)  # fx.Node values (checked where the role is made)
    #: The conv, linear or BatchNorm whose parameters follow the channels (``None`` for parameterless ops).
    module: Any = None
    #: ``+``, ``-`` or ``*`` of two values (or a value and a number).
    binary: bool = False


def width(node: Any) -> int | None:
    """The channel count of ``node``'s value (dimension 1 of a 2-D or 4-D value), else ``None``."""
    dims = shape(node)
    return dims[1] if dims is not None and len(dims) in (2, 4) else None


def classify(gm: fx.GraphModule) -> dict[fx.Node, Role]:
    """The :class:`Role` of every node of ``gm`` (its nodes carry ``tensor_meta`` shapes)."""
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    shared = _shared_parameters(gm)
    return {node: _role(gm, node, calls, shared) for node in gm.graph.nodes}


def _shared_parameters(gm: fx.GraphModule) -> set[str]:
    """Modules holding a tensor another module holds too (tied weights): never resized."""
    owners: dict[int, list[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                owners.setdefault(id(tensor), []).append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}


def _role(gm: fx.GraphModule, node: fx.Node, calls: Counter[Any], shared: set[str]) -> Role:
    if node.op == "call_module":
        return _module_role(gm.get_submodule(str(node.target)), node, calls[node.target] == 1 and
                            str(node.target) not in shared)  # fmt: skip
    if node.op == "call_function":
        return _function_role(node)
    if node.op == "call_method":
        return _method_role(node)
    return Role("barrier")


def _data(node: fx.Node) -> fx.Node | None:
    """The first argument when it is a node with channels of the output's width."""
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) and width(first) is not None and width(first) == width(node) else None


def _unary(node: fx.Node) -> Role:
    source = _data(node)
    same_rank = source is not None and len(shape(source) or ()) == len(shape(node) or ())
    return Role("channelwise", [source]) if source is not None and same_rank else Role("barrier")


def _module_role(module: nn.Module, node: fx.Node, single: bool) -> Role:
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    rank = len(shape(source) or ()) if isinstance(source, fx.Node) else 0
    if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and single and rank == 4:
        if module.groups == module.in_channels == module.out_channels:
            return Role("channelwise", [source], module)
        return Role("layer", [source], module)
    if type(module) is nn.Linear and single and rank == 2:
        return Role("layer", [source], module)
    if isinstance(module, _BatchNorm) and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and module.affine:
        return _with_module(_unary(node), module) if single and module.track_running_stats else Role("barrier")
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        return _unary(node)
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is None:
        return _unary(node)
    if isinstance(module, (*MONOTONE_MODULES, *OTHER_MODULES, *_PASS_MODULES)):
        return _unary(node)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _flatten(node)
    return Role("barrier")


def _with_module(role: Role, module: nn.Module) -> Role:
    role.module = module if role.kind == "channelwise" else None
    return role


def _function_role(node: fx.Node) -> Role:
    target = node.target
    if target in _BINARY:
        return _binary(node)
    if target in (*MONOTONE_FUNCTIONS, *OTHER_FUNCTIONS, *_POOL_FUNCTIONS, F.max_pool2d, F.avg_pool2d, F.dropout):
        return _pool_function(node) if target in (F.max_pool2d, F.avg_pool2d) else _unary(node)
    if target is torch.cat:
        return _cat(node)
    if target is torch.flatten and node.args[1:] in ((1,), (1, -1)) and not node.kwargs:
        return _flatten(node)
    if target is torch.mean:
        return _mean(node)
    return Role("barrier")


def _pool_function(node: fx.Node) -> Role:
    """Pools called as functions: only without ``return_indices``/``divisor_override`` (read by keyword)."""
    if node.kwargs.get("return_indices") or node.kwargs.get("divisor_override") is not None or len(node.args) > 5:
        return Role("barrier")
    return _unary(node)


def _method_role(node: fx.Node) -> Role:
    name = node.target
    if name == "size" and node.args[1:] == (0,):
        return Role("size0")
    if name in _BINARY_METHODS:
        return _binary(node)
    if name in (*MONOTONE_METHODS, "contiguous"):
        return _unary(node)
    if name == "flatten" and node.args[1:] in ((1,), (1, -1)) and not node.kwargs:
        return _flatten(node)
    if name in ("view", "reshape") and _flattening_sizes(node.args[1:]):
        return _flatten(node)
    if name == "mean":
        return _mean(node)
    return Role("barrier")


def _flattening_sizes(sizes: tuple[Any, ...]) -> bool:
    """``(n, -1)``: the batch size (a number or ``x.size(0)``), then every other dimension."""
    if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
        sizes = tuple(sizes[0])
    return len(sizes) == 2 and sizes[1] == -1 and sizes[0] != -1


def _binary(node: fx.Node) -> Role:
    """``a + b``, ``a - b``, ``a * b`` (``torch.add`` without ``alpha``): both same-shaped, or one a number."""
    if node.kwargs or len(node.args) != 2:
        return Role("barrier")
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    numbers = [a for a in node.args if isinstance(a, int | float) and not isinstance(a, bool)]
    if width(node) is None or len(tensors) + len(numbers) != 2 or not tensors:
        return Role("barrier")
    if any(shape(t) != shape(node) for t in tensors):
        return Role("barrier")
    return Role("channelwise", tensors, binary=True)


def _cat(node: fx.Node) -> Role:
    values = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(shape(node) or ())
    if rank not in (2, 4) or dim not in (1, 1 - rank) or not isinstance(values, list | tuple):
        return Role("barrier")
    if not all(isinstance(v, fx.Node) and width(v) is not None for v in values):
        return Role("barrier")
    return Role("cat", list(values))


def _flatten(node: fx.Node) -> Role:
    source = node.args[0] if node.args else None
    dims = shape(node)
    if not isinstance(source, fx.Node) or len(shape(source) or ()) != 4 or dims is None or len(dims) != 2:
        return Role("barrier")
    return Role("flatten", [source])


def _mean(node: fx.Node) -> Role:
    """A mean over the two spatial dimensions of a 4-D value (``keepdim`` or not)."""
    source = node.args[0] if node.args else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = len(shape(source) or ()) if isinstance(source, fx.Node) else 0
    if rank != 4 or not isinstance(dims, tuple | list) or tuple(dims) not in _SPATIAL:
        return Role("barrier")
    if width(node) != width(source) or set(node.kwargs) - {"dim", "keepdim"}:
        return Role("barrier")
    return Role("channelwise", [source])
