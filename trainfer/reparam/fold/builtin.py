"""The built-in fold handlers: what each recognised call computes as a step of a linear region.

Each handler follows the contract of :func:`trainfer.reparam.fold.register_fold_handler`:
``handler(context, node)`` returns the node's :class:`~trainfer.reparam.fold.regions.Expr`
(through ``context.linear``/``context.chain``/``context.add_branches``) or None when the node is
not linear here. :data:`BUILTIN_HANDLERS` maps call targets to them: module types (matched along
the module's class hierarchy), functions, and ``Tensor`` method names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold.calls import bind
from trainfer.reparam.fold.regions import Expr, FoldContext
from trainfer.reparam.fold.shapes import numel, shape

__all__ = ["BUILTIN_HANDLERS", "Handler"]

#: ``handler(context, node)``: the node's linear expression, or None.
Handler = Callable[[FoldContext, fx.Node], "Expr | None"]


def _rank(node: fx.Node) -> int:
    return len(shape(node) or ())


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


# --- convolutions, linears, batch norms -------------------------------------------------------------


def conv_module(context: FoldContext, node: fx.Node) -> Expr | None:
    if _rank(node) != 4:
        return None
    try:
        op = ConvOp.from_module(cast(nn.Conv2d, context.module(node)))  # the nn.Conv2d entry: its class matched
    except AlgebraError as error:
        context.keep(node, str(error))
        return None
    return context.linear(node, _input(node), op)


def conv_function(context: FoldContext, node: fx.Node) -> Expr | None:
    bound = bind(node, "conv")
    weight = context.constant(bound["weight"]) if _rank(node) == 4 else None
    if weight is None:
        return None
    bias = context.constants.bias(bound["bias"], weight)
    args = (bound["stride"], bound["padding"], bound["dilation"], bound["groups"])
    return context.linear(node, bound["input"], ConvOp.from_call(weight, bias, *args))


def _dense(context: FoldContext, node: fx.Node, source: Any, weight: Any, bias: Any) -> Expr | None:
    """``nn.Linear``/``F.linear`` as a 1x1 conv over ``(N, features, 1, 1)``."""
    weight_ = context.constant(weight) if _rank(node) == 2 else None
    if weight_ is None:
        return None
    op = ConvOp(weight_[:, :, None, None], context.constants.bias(bias, weight_))
    return context.linear(node, source, op)


def linear_module(context: FoldContext, node: fx.Node) -> Expr | None:
    module = context.module(node)
    return _dense(context, node, _input(node), module.weight, module.bias)


def linear_function(context: FoldContext, node: fx.Node) -> Expr | None:
    bound = bind(node, "linear")
    return _dense(context, node, bound["input"], bound["weight"], bound["bias"])


def batch_norm_module(context: FoldContext, node: fx.Node) -> Expr | None:
    bn = cast(_BatchNorm, context.module(node))  # the _BatchNorm entry: handler_for matched the module's class
    if bn.running_mean is None:
        context.keep(node, "track_running_stats=False normalises with batch statistics")
        return None
    return context.chain(node, _input(node), context.affine(*algebra.bn_affine(bn)))


def batch_norm_function(context: FoldContext, node: fx.Node) -> Expr | None:
    bound = bind(node, "batch_norm")
    if bound["training"] is not False or bound["running_mean"] is None:
        return None
    names = ("running_mean", "running_var", "weight", "bias")
    stats = [context.constant(bound[k]) for k in names]
    mean, var, weight, bias = stats
    if mean is None or var is None or any(value is None and bound[k] is not None for k, value in zip(names, stats)):
        return None  # statistics absent, or statistics or affine parameters computed from the input
    affine = algebra.batch_norm_affine(mean, var, weight, bias, bound["eps"])
    return context.chain(node, bound["input"], context.affine(*affine))


# --- padding, pooling, cropping ----------------------------------------------------------------------


def _static(*values: Any) -> bool:
    """No value (nor element of a tuple/list value) is computed in the graph."""
    return not any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and not _static(*v)) for v in values)


def _pad(context: FoldContext, node: fx.Node, bound: dict[str, Any]) -> Expr | None:
    """Zero padding after a pointwise op whose bias equals the pad value is that op with more padding."""
    if bound["mode"] != "constant" or not _static(bound["pad"], bound["value"]) or len(bound["pad"]) not in (2, 4):
        return None
    value = float(bound["value"] or 0.0)

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        op = previous or context.identity(anchor)
        if op.kernel_size != (1, 1) or op.stride != (1, 1) or op.dilation != (1, 1):
            raise AlgebraError(f"padding after a {op.kernel_size} conv is not a conv's padding")
        if not bool((op.bias == value).all()):
            raise AlgebraError(f"pad value {value} differs from the bias it pads (the border would change)")
        return algebra.pad_input(op, list(bound["pad"]))

    return context.chain(node, bound["input"], step)


def pad_module(context: FoldContext, node: fx.Node) -> Expr | None:
    module = context.module(node)
    bound = {"input": _input(node), "pad": module.padding, "mode": "constant", "value": module.value}
    return _pad(context, node, bound)


def pad_function(context: FoldContext, node: fx.Node) -> Expr | None:
    return _pad(context, node, bind(node, "pad")) if _rank(node) == 4 else None


_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_pool(context: FoldContext, node: fx.Node, bound: dict[str, Any]) -> Expr | None:
    if _rank(node) != 4 or not _static(*(bound[k] for k in _POOL_ARGUMENTS[:5])):
        return None
    padded = algebra.pair(bound["padding"]) != (0, 0)
    if bound["ceil_mode"] or (padded and not bound["count_include_pad"]) or bound["divisor_override"] is not None:
        context.keep(
            node,
            "only avg-pool with ceil_mode=False and, when it pads, count_include_pad=True "
            "folds (otherwise border windows have their own divisor)",
        )
        return None

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        meta = node.meta["tensor_meta"]  # pooling keeps the channels
        sizes = (bound["kernel_size"], bound["stride"] or None, bound["padding"])
        pool = algebra.avg_pool(meta.shape[1], *sizes, dtype=meta.dtype, device=context.constants.device)
        return pool if previous is None else algebra.sequential(previous, pool)

    kh, kw = algebra.pair(bound["kernel_size"])
    return context.chain(node, bound["input"], step, numel(node) * kh * kw)  # each output sums kh * kw inputs


def avg_pool_module(context: FoldContext, node: fx.Node) -> Expr | None:
    module = context.module(node)
    bound = {name: getattr(module, name) for name in _POOL_ARGUMENTS}
    return _avg_pool(context, node, {**bound, "input": _input(node)})


def avg_pool_function(context: FoldContext, node: fx.Node) -> Expr | None:
    return _avg_pool(context, node, bind(node, "avg_pool"))


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


def crop(context: FoldContext, node: fx.Node) -> Expr | None:
    """``x[:, :, c:-c, :]`` and the like (ACNet's crop before a 1xk conv): a shift the next conv absorbs."""
    rows_cols = _symmetric_crop(node.args[1]) if len(node.args) == 2 and _rank(node) == 4 else None
    if rows_cols is None:
        return None

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        meta = node.meta["tensor_meta"]
        op = algebra.crop(meta.shape[1], *rows_cols, dtype=meta.dtype, device=context.constants.device)
        return op if previous is None else algebra.sequential(previous, op)

    return context.chain(node, node.args[0], step)


# --- arithmetic ---------------------------------------------------------------------------------------


def _channel_vector(node: fx.Node, constant: Tensor | None) -> Tensor | None:
    """``constant`` as one value per channel of ``node``'s output, if it broadcasts that way."""
    shape_ = shape(node)
    if constant is None or shape_ is None or constant.dim() > len(shape_):
        return None
    if constant.numel() == 1:
        return constant.reshape(())
    aligned = (1,) * (len(shape_) - constant.dim()) + tuple(constant.shape)
    if any(size != 1 for i, size in enumerate(aligned) if i != 1) or aligned[1] != shape_[1]:
        return None
    return constant.reshape(-1)


def _split_constant(context: FoldContext, node: fx.Node) -> tuple[fx.Node, Tensor, bool] | None:
    """``(variable, per-channel constant, variable is the left operand)`` of a binary op, if one is constant."""
    if len(node.args) != 2:
        return None
    for variable, constant, is_left in ((node.args[0], node.args[1], True), (node.args[1], node.args[0], False)):
        if not isinstance(variable, fx.Node) or context.constant(variable) is not None:
            continue
        vector = _channel_vector(node, context.constants.operand(constant))
        if vector is not None:
            return variable, vector, is_left
    return None


def _add(context: FoldContext, node: fx.Node, subtract: bool) -> Expr | None:
    """Branches of one anchor add up; ``x + c`` with a per-channel constant shifts the bias."""
    if node.kwargs:
        return None  # alpha=..., out=...
    split = _split_constant(context, node)
    if split is not None:
        variable, constant, is_left = split
        factor = -1.0 if subtract and not is_left else 1.0  # c - x
        shift = -constant if subtract and is_left else constant  # x - c
        return context.chain(node, variable, context.affine(torch.tensor(factor), shift))
    left, right = node.args[0], node.args[1]
    if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
        return None
    if not shape(left) == shape(right) == shape(node):
        return None  # broadcasting
    return context.add_branches(node, left, right, -1.0 if subtract else 1.0)


def add(context: FoldContext, node: fx.Node) -> Expr | None:
    return _add(context, node, subtract=False)


def subtract(context: FoldContext, node: fx.Node) -> Expr | None:
    return _add(context, node, subtract=True)


def _scale(context: FoldContext, node: fx.Node, divide: bool) -> Expr | None:
    """``x * c`` / ``x / c`` with ``c`` a constant scalar or per-channel tensor."""
    split = _split_constant(context, node)
    if split is None or node.kwargs or (divide and not split[2]):
        return None
    variable, factor, _ = split
    return context.chain(node, variable, context.affine(1.0 / factor if divide else factor, None))


def multiply(context: FoldContext, node: fx.Node) -> Expr | None:
    return _scale(context, node, divide=False)


def divide(context: FoldContext, node: fx.Node) -> Expr | None:
    return _scale(context, node, divide=True)


def negate(context: FoldContext, node: fx.Node) -> Expr | None:
    return context.chain(node, _input(node), context.affine(torch.tensor(-1.0), None))


def _each(targets: tuple[Any, ...], handler: Handler) -> dict[Any, Handler]:
    return dict.fromkeys(targets, handler)


#: Call target -> handler: module types, functions, ``Tensor`` method names (in-place forms included).
BUILTIN_HANDLERS: dict[Any, Handler] = {
    nn.Conv2d: conv_module,
    nn.Linear: linear_module,
    _BatchNorm: batch_norm_module,
    nn.AvgPool2d: avg_pool_module,
    nn.ConstantPad2d: pad_module,
    torch.conv2d: conv_function,  # is F.conv2d
    F.linear: linear_function,
    F.batch_norm: batch_norm_function,
    F.pad: pad_function,
    **_each((F.avg_pool2d, torch._C._nn.avg_pool2d), avg_pool_function),
    **_each((operator.add, operator.iadd, torch.add, "add", "add_"), add),
    **_each((operator.sub, operator.isub, torch.sub, "sub", "sub_"), subtract),
    **_each((operator.mul, operator.imul, torch.mul, "mul", "mul_"), multiply),
    **_each((operator.truediv, operator.itruediv, torch.div, "div", "div_"), divide),
    **_each((operator.neg, torch.neg, "neg"), negate),
    operator.getitem: crop,
}
