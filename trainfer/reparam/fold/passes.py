"""Graph rewrites the folder runs before it looks for linear regions (each exact, each one pass).

* :func:`drop_eval_noops`: Dropout (any kind) and ``nn.Identity`` compute the identity in eval
  mode; they are bypassed.
* :func:`split_padding_modes`: a conv with ``padding_mode='reflect'`` (etc.) becomes
  ``F.pad(mode=...)`` then a zero-padded conv, which can then take a BatchNorm.
* :func:`resolve_rank_checks`: ``torch._assert(x.ndim == 4, ...)`` (timm's ``BatchNormAct2d`` and
  others) reads the conv output a second time, which stops the conv from absorbing the batch norm
  after it. A value's rank is fixed by the traced graph, so rank queries become constants, and
  assertions that then hold statically are dropped.
* :func:`move_batch_norms_into_heads`: ``BN -> global average pool -> flatten -> Linear`` (a head
  after a final norm): a per-channel affine commutes with averaging over space and with flattening
  a ``(N, C, 1, 1)`` value, ``mean(s x + t) = s mean(x) + t``, so the batch norm moves next to the
  linear layer, which then absorbs it.
* :func:`fold_norms_into_channels_last_linears`: ``Linear`` on a channels-last value, permuted to
  channels-first, then ``BatchNorm2d`` (and a per-channel factor): they fold into the Linear.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError
from trainfer.reparam.fold import builtin
from trainfer.reparam.fold.builtin import Handler
from trainfer.reparam.fold.calls import bind, target_name
from trainfer.reparam.fold.constants import Constants
from trainfer.reparam.fold.handlers import FoldHandlers
from trainfer.reparam.fold.log import FoldedRegion, FoldLog, describe
from trainfer.reparam.fold.shapes import shape

__all__ = [
    "drop_eval_noops",
    "fold_norms_into_channels_last_linears",
    "move_batch_norms_into_heads",
    "resolve_rank_checks",
    "split_padding_modes",
]


def _is(node: fx.Node, modules: dict[str, nn.Module], handlers: FoldHandlers, *kinds: Handler) -> bool:
    """The handler table reads ``node`` with one of the built-in handlers ``kinds`` (a BatchNorm, a conv...):
    the passes recognise ops the one way recognition does (a type with a handler of its own is not theirs)."""
    return node.op in ("call_module", "call_function", "call_method") and handlers.handler_for(node, modules) in kinds


_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


def drop_eval_noops(gm: fx.GraphModule, prefix: str) -> list[str]:
    """Bypass and erase Dropout (modules, and functions called with ``training=False``) and ``nn.Identity``.

    Returns what was dropped, each named with ``prefix`` for the log.
    """
    modules, dropped = dict(gm.named_modules()), []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], (_DropoutNd, nn.Identity)):
            what = f"{prefix}{node.target} ({type(modules[node.target]).__name__})"
        elif node.op == "call_function" and node.target in _DROPOUT and bind(node)["training"] is False:
            what = f"{node.name} ({node.target.__name__}, training=False)"
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped.append(what)
    return dropped


def split_padding_modes(gm: fx.GraphModule, handlers: FoldHandlers) -> None:
    """Give each conv with a non-zero ``padding_mode`` an ``F.pad(mode=...)`` before it, and zero padding.

    The pad is not a convolution, but the conv after it then is one and can take a BatchNorm.
    """
    modules = dict(gm.named_modules())
    calls = [
        (node, modules[node.target])
        for node in gm.graph.nodes
        if _is(node, modules, handlers, builtin.conv_module) and modules[node.target].padding_mode != "zeros"
    ]
    for node, module in calls:  # every call first: a shared conv is converted once, after
        pads = tuple(module._reversed_padding_repeated_twice)
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(F.pad, (node.args[0], pads), {"mode": module.padding_mode})
        node.args = (padded, *node.args[1:])
    for _, module in calls:
        module.padding, module.padding_mode = (0, 0), "zeros"


# --- rank checks ------------------------------------------------------------------------------------

_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_}
_ASSERTS = {torch._assert}


def _rank_query(node: fx.Node) -> fx.Node | None:
    """The tensor whose rank ``node`` asks for (``x.ndim``, ``x.dim()``, ``x.ndimension()``), else None."""
    asks_rank = (node.op == "call_function" and node.target is getattr and node.args[1:] == ("ndim",)) or (
        node.op == "call_method" and node.target in ("dim", "ndimension") and len(node.args) == 1
    )
    source = node.args[0] if asks_rank else None
    return source if isinstance(source, fx.Node) else None


def _static_value(node: fx.Node) -> tuple[bool, Any]:
    """``(True, value)`` for a rank query or a comparison of static values, ``(False, None)`` otherwise."""
    source = _rank_query(node)
    if source is not None:
        meta = source.meta.get("tensor_meta")
        return (True, len(meta.shape)) if meta is not None and hasattr(meta, "shape") else (False, None)
    if node.op == "call_function" and node.target in _COMPARISONS and not node.all_input_nodes:
        return True, node.target(*node.args)
    return False, None


def _replace_with_constant(node: fx.Node, value: Any) -> None:
    """Every use of ``node`` reads the constant ``value`` instead."""

    def swap(argument: fx.Node) -> Any:
        return value if argument is node else argument

    for user in list(node.users):
        user.args, user.kwargs = fx.node.map_arg(user.args, swap), fx.node.map_arg(user.kwargs, swap)


def resolve_rank_checks(graph: fx.Graph) -> int:
    """Replace rank queries (and comparisons of them) by constants; drop asserts that hold. Returns how many.

    Needs ``tensor_meta`` (shape propagation). One pass in graph order suffices: a comparison's
    arguments come before it and are already constants when it is reached.
    """
    resolved = 0
    for node in list(graph.nodes):
        static, value = _static_value(node)
        if static:
            _replace_with_constant(node, value)
            graph.erase_node(node)
            resolved += 1
        elif node.op == "call_function" and node.target in _ASSERTS and node.args and node.args[0] is True:
            graph.erase_node(node)
            resolved += 1
    return resolved


# --- batch norms into heads -------------------------------------------------------------------------

_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, "flatten", "view", "reshape", "squeeze"}
_MEANS = {torch.mean, "mean"}


def _averages_space(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Global average pooling of a 4-D value: ``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``,
    ``x.mean((2, 3))`` (``keepdim`` either way)."""
    if node.op == "call_module":
        module = modules[target_name(node)]
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if node.target is F.adaptive_avg_pool2d:
        return node.args[1:2] in ((1,), ((1, 1),)) or node.kwargs.get("output_size") in (1, (1, 1))
    if node.target in _MEANS and len(node.args) >= 2 and not set(node.kwargs) - {"keepdim"}:
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else (node.args[1],)
        return sorted(d % 4 for d in dims if isinstance(d, int)) == [2, 3] and len(dims) == 2
    return False


def _drops_unit_dims(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten/view/reshape/squeeze that turns ``(N, C, 1, 1)`` into ``(N, C)``."""
    reshape = (node.op == "call_module" and isinstance(modules[target_name(node)], nn.Flatten)) or (
        node.op in ("call_function", "call_method") and node.target in _RESHAPES
    )
    source = node.args[0] if node.args else None
    before, after = shape(source), shape(node)
    return (
        reshape
        and before is not None
        and after is not None
        and len(before) == 4
        and before[2:] == (1, 1)
        and after == before[:2]
    )


def _commutes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node(s x + t) = s node(x) + t`` for per-channel ``s, t``, and it keeps channels on dim 1."""
    return node.op in ("call_module", "call_function", "call_method") and (
        _averages_space(node, modules) or _drops_unit_dims(node, modules)
    )


def _shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.shape``, ``x.ndim``, ``x.dim()``: reads the value's shape, not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "ndimension")
    return node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",), ("ndim",))


def _batch_norm_arguments(
    node: fx.Node, modules: dict[str, nn.Module], graph: fx.Graph, handlers: FoldHandlers
) -> tuple | None:
    """``(input, running_mean, running_var, weight, bias, eps)`` of an eval-mode batch norm node, else None."""
    if _is(node, modules, handlers, builtin.batch_norm_module):
        module = cast(_BatchNorm, modules[target_name(node)])
        if module.running_mean is None:
            return None
        with graph.inserting_before(node):
            stats = [graph.get_attr(f"{node.target}.{name}") if getattr(module, name) is not None else None
                     for name in ("running_mean", "running_var", "weight", "bias")]  # fmt: skip
        return (node.args[0], *stats, module.eps)
    if not _is(node, modules, handlers, builtin.batch_norm_function):
        return None
    bound = bind(node)
    if not builtin.normalises_with_running_statistics(bound):
        return None
    return tuple(bound[k] for k in ("input", "running_mean", "running_var", "weight", "bias", "eps"))


def _head_after(node: fx.Node, modules: dict[str, nn.Module], handlers: FoldHandlers) -> list[fx.Node] | None:
    """The commuting ops from ``node``'s only user on to a linear layer, if the chain reaches one."""
    chain: list[fx.Node] = []
    users = list(node.users)
    while len(users) == 1:  # finite: each step goes one node further down the (acyclic) graph
        node = users[0]
        users = [user for user in node.users if not _shape_query(user)]  # sizes do not change when BN moves
        if _is(node, modules, handlers, builtin.linear_module, builtin.linear_function):
            return chain or None
        if not _commutes(node, modules):
            return None
        chain.append(node)
    return None


def move_batch_norms_into_heads(gm: fx.GraphModule, handlers: FoldHandlers) -> int:
    """Move each eval-mode batch norm that reaches a linear layer through commuting ops to just before it.

    The moved batch norm is an ``F.batch_norm`` call on the value the linear layer reads (its
    statistics read from the same buffers). Needs ``tensor_meta``; returns how many moved.
    """
    modules, graph, moved = dict(gm.named_modules()), gm.graph, 0
    for node in list(graph.nodes):
        chain = _head_after(node, modules, handlers)
        arguments = _batch_norm_arguments(node, modules, graph, handlers) if chain else None
        if chain is None or arguments is None:
            continue
        source, mean, var, weight, bias, eps = arguments
        chain[0].replace_input_with(node, source)
        last = chain[-1]
        with graph.inserting_after(last):
            affine = {"weight": weight, "bias": bias, "eps": eps}
            moved_bn = graph.call_function(F.batch_norm, (last, mean, var), affine)
        moved_bn.meta = dict(last.meta)
        last.replace_all_uses_with(moved_bn, delete_user_cb=partial(operator.is_not, moved_bn))
        graph.erase_node(node)
        moved += 1
    return moved


def fold_norms_into_channels_last_linears(
    gm: fx.GraphModule, prefix: str, log: FoldLog, handlers: FoldHandlers
) -> None:
    """``Linear`` (channels-last) ``-> permute(0, 3, 1, 2) -> BatchNorm2d [-> * gamma]`` (UniRepLKNet's
    feed-forward): the Linear's outputs are the batch norm's channels, so the batch norm, and a
    per-channel constant factor after it, fold into the Linear (``algebra.fuse_linear_bn``);
    the permute stays. Each fold is logged as a region."""
    modules, graph = dict(gm.named_modules()), gm.graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    for node in list(graph.nodes):
        chain = _linear_permute_norm(node, modules, calls, handlers)
        if chain is None:
            continue
        linear, permute, norm = chain
        layer, bn = modules[target_name(linear)], cast(_BatchNorm, modules[target_name(norm)])
        try:
            weight, bias = algebra.fuse_linear_bn(layer.weight.detach(), _detached(layer.bias), bn)
        except AlgebraError:
            continue
        members, last = [linear, norm], norm
        factor = _channel_factor(last, weight.shape[0], Constants(gm), modules, handlers)
        if factor is not None:
            factor = factor.to(weight.dtype)
            weight, bias = weight * factor[:, None], bias * factor
            last = next(iter(norm.users))
            members.append(last)
        fused = algebra.to_linear(weight, bias)
        gm.add_submodule(target_name(linear), fused)  # the one call of this Linear: replaced in place
        last.replace_all_uses_with(permute)
        for member in reversed(members[1:]):
            graph.erase_node(member)
        names = [f"{prefix}{target_name(linear)}", f"{prefix}{target_name(norm)}"] + [m.name for m in members[2:]]
        log.regions.append(FoldedRegion(f"{prefix}{target_name(linear)}", names, describe(fused)))


def _linear_permute_norm(
    node: fx.Node, modules: dict[str, nn.Module], calls: list[Any], handlers: FoldHandlers
) -> tuple[fx.Node, ...] | None:
    """``(linear, permute, norm)`` when ``node`` is a once-called Linear feeding only that chain."""
    if not _is(node, modules, handlers, builtin.linear_module) or calls.count(node.target) != 1:
        return None
    permute = next(iter(node.users)) if len(node.users) == 1 else None
    if permute is None or not _is_channels_first_permute(permute) or len(permute.users) != 1:
        return None
    norm = next(iter(permute.users))
    if not _is(norm, modules, handlers, builtin.batch_norm_module) or norm.args[:1] != (permute,):
        return None
    if cast(_BatchNorm, modules[target_name(norm)]).running_var is None:
        return None
    return node, permute, norm


def _is_channels_first_permute(node: fx.Node) -> bool:
    """``x.permute(0, 3, 1, 2)`` / ``torch.permute(x, (0, 3, 1, 2))``: NHWC -> NCHW."""
    method = node.op == "call_method" and node.target == "permute"
    if not (method or node.op == "call_function" and node.target is torch.permute):
        return False
    order: Any = (
        node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) == 2 else node.kwargs.get("dims")
    )
    return tuple(order or ()) == (0, 3, 1, 2)


def _channel_factor(
    norm: fx.Node, channels: int, constants: Constants, modules: dict[str, nn.Module], handlers: FoldHandlers
) -> torch.Tensor | None:
    """The per-channel (or scalar) constant factor of ``norm``'s one user ``gamma * x``, as the
    multiplication handler reads it (:func:`~trainfer.reparam.fold.builtin.channel_vector`)."""
    user = next(iter(norm.users)) if len(norm.users) == 1 else None
    if user is None or not _is(user, modules, handlers, builtin.multiply) or len(user.args) != 2 or user.kwargs:
        return None
    other = user.args[1] if user.args[0] is norm else user.args[0]
    vector = builtin.channel_vector(user, constants.operand(other))
    return None if vector is None else vector.expand(channels)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach() if tensor is not None else None
