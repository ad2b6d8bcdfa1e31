"""The built-in fold handlers: what each recognised call computes as a step of a linear region.

Each handler follows the contract of :func:`trainfer.reparam.fold.register_fold_handler`:
``handler(context, node)`` returns the node's :class:`~trainfer.reparam.fold.regions.Expr`
(through ``context.linear``/``context.chain``/``context.add_branches``) or raises
:class:`~trainfer.reparam.fold.linearity.NotLinear` when the node is not linear here.
:data:`BUILTIN_HANDLERS` maps call targets to them: module types (matched along the module's class
hierarchy), functions, and ``Tensor`` method names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam import algebra
from trainfer.reparam.algebra import AlgebraError, ConvOp
from trainfer.reparam.fold.calls import bind
from trainfer.reparam.fold.linearity import NotLinear
from trainfer.reparam.fold.regions import Expr, FoldContext
from trainfer.reparam.fold.shapes import numel, shape
from trainfer.reparam.fold.trace import assign

__all__ = ["BUILTIN_HANDLERS", "Handler", "channel_vector", "normalises_with_running_statistics"]

#: ``handler(context, node)``: the node's linear expression (it raises ``NotLinear`` where there is none).
Handler = Callable[[FoldContext, fx.Node], Expr]


def _rank(node: fx.Node) -> int:
    return len(shape(node) or ())


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _require(condition: bool, reason: str = "") -> None:
    """Raise :class:`NotLinear` (``reason``: what the log says, if anything) unless ``condition`` holds."""
    if not condition:
        raise NotLinear(reason)


@contextmanager
def _exact() -> Iterator[None]:
    """An :class:`AlgebraError` inside (the algebra refuses an inexact rewrite) as :class:`NotLinear`."""
    try:
        yield
    except AlgebraError as error:
        raise NotLinear(str(error)) from error


# --- convolutions, linears, batch norms -------------------------------------------------------------


def conv_module(context: FoldContext, node: fx.Node) -> Expr:
    _require(_rank(node) == 4)
    with _exact():
        op = ConvOp.from_module(cast(nn.Conv2d, context.module(node)))  # the nn.Conv2d entry: its class matched
    return context.linear(node, _input(node), op)


def conv_function(context: FoldContext, node: fx.Node) -> Expr:
    bound = bind(node)
    weight = context.constant(bound["weight"]) if _rank(node) == 4 else None
    if weight is None:
        raise NotLinear()
    bias = context.constants.bias(bound["bias"], weight)
    args = (bound["stride"], bound["padding"], bound["dilation"], bound["groups"])
    with _exact():
        op = ConvOp.from_call(weight, bias, *args)
    return context.linear(node, bound["input"], op)


def _dense(context: FoldContext, node: fx.Node, source: Any, weight: Any, bias: Any) -> Expr:
    """``nn.Linear``/``F.linear`` as a 1x1 conv over ``(N, features, 1, 1)``."""
    weight_ = context.constant(weight) if _rank(node) == 2 else None
    if weight_ is None:
        raise NotLinear()
    op = ConvOp(weight_[:, :, None, None], context.constants.bias(bias, weight_))
    return context.linear(node, source, op)


def linear_module(context: FoldContext, node: fx.Node) -> Expr:
    module = context.module(node)
    return _dense(context, node, _input(node), module.weight, module.bias)


def linear_function(context: FoldContext, node: fx.Node) -> Expr:
    bound = bind(node)
    return _dense(context, node, bound["input"], bound["weight"], bound["bias"])


def batch_norm_module(context: FoldContext, node: fx.Node) -> Expr:
    bn = cast(_BatchNorm, context.module(node))  # the _BatchNorm entry: handler_for matched the module's class
    _require(bn.running_mean is not None, "track_running_stats=False normalises with batch statistics")
    return context.chain(node, _input(node), context.affine(*algebra.bn_affine(bn)))


def normalises_with_running_statistics(bound: dict[str, Any]) -> bool:
    """An ``F.batch_norm`` call (its bound arguments) in eval mode, with running statistics: an affine map."""
    return bound["training"] is False and bound["running_mean"] is not None


def batch_norm_function(context: FoldContext, node: fx.Node) -> Expr:
    bound = bind(node)
    _require(normalises_with_running_statistics(bound))
    names = ("running_mean", "running_var", "weight", "bias")
    stats = [context.constant(bound[k]) for k in names]
    mean, var, weight, bias = stats
    computed = any(value is None and bound[k] is not None for k, value in zip(names, stats))
    _require(mean is not None and var is not None and not computed)  # statistics absent or computed from the input
    affine = algebra.batch_norm_affine(cast(Tensor, mean), cast(Tensor, var), weight, bias, bound["eps"])
    return context.chain(node, bound["input"], context.affine(*affine))


# --- padding, pooling, cropping ----------------------------------------------------------------------


def _static(*values: Any) -> bool:
    """No value (nor element of a tuple/list value) is computed in the graph."""
    return not any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and not _static(*v)) for v in values)


def _same_per_channel(bias: Tensor, value: Tensor) -> bool:
    """``bias == value`` on every channel, up to the rounding of computing one constant two ways
    (DBB's ``b - m * w / sqrt(v + eps)`` vs the algebra's ``b - m * (w / sqrt(v + eps))``): within 64
    ulps of the largest magnitude. Verification, not this test, is the proof of exactness."""
    value = value.to(bias.dtype).expand_as(bias)
    scale = torch.maximum(bias.abs().max(), value.abs().max()) if bias.numel() else bias.new_zeros(())
    return bool(((bias - value).abs() <= 64 * torch.finfo(bias.dtype).eps * scale).all())


def _pad_step(context: FoldContext, pads: list[int], value: Tensor) -> Any:
    """The step of a pad whose border holds ``value`` (a scalar or one per channel) after a pointwise op:
    where ``value`` is that op's bias, it is the op with more (zero) input padding."""

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        op = previous or context.identity(anchor)
        if op.kernel_size != (1, 1) or op.stride != (1, 1) or op.dilation != (1, 1):
            raise AlgebraError(f"padding after a {op.kernel_size} conv is not a conv's padding")
        if not _same_per_channel(op.bias, value):
            raise AlgebraError("the pad value differs from the bias it pads (the border would change)")
        return algebra.pad_input(op, pads)

    return step


def _pad(context: FoldContext, node: fx.Node, bound: dict[str, Any]) -> Expr:
    """Zero padding after a pointwise op whose bias equals the pad value is that op with more padding."""
    _require(bound["mode"] == "constant" and _static(bound["pad"], bound["value"]) and len(bound["pad"]) in (2, 4))
    _require(not any(user.target is assign for user in node.users))  # a border fill: its last write's handler
    value = torch.tensor(float(bound["value"] or 0.0), dtype=torch.float64)
    return context.chain(node, bound["input"], _pad_step(context, list(bound["pad"]), value))


def pad_module(context: FoldContext, node: fx.Node) -> Expr:
    module = context.module(node)
    bound = {"input": _input(node), "pad": module.padding, "mode": "constant", "value": module.value}
    return _pad(context, node, bound)


def pad_function(context: FoldContext, node: fx.Node) -> Expr:
    _require(_rank(node) == 4)
    return _pad(context, node, bind(node))


def _strip(index: Any, height: int, width: int) -> tuple[int, int, int] | None:
    """``(dim, first, stop)``: the rows (``dim`` 2) or columns (3) ``[first, stop)`` that
    ``x[index]`` selects on every channel and batch item of a ``(N, C, height, width)`` value, else None."""
    parts = index if isinstance(index, tuple) else (index,)
    parts = parts + (slice(None),) * (4 - len(parts))
    if len(parts) != 4 or any(not isinstance(p, slice) or p.step not in (None, 1) for p in parts):
        return None
    if any(p != slice(None) for p in parts[:2]) or all(p != slice(None) for p in parts[2:]):
        return None
    dim = 2 if parts[2] != slice(None) else 3
    if parts[5 - dim] != slice(None):
        return None  # a corner, not a strip
    if not all(isinstance(b, int | None) for b in (parts[dim].start, parts[dim].stop)):
        return None
    first, stop, _ = parts[dim].indices((height, width)[dim - 2])
    return dim, first, stop


def border_fill(context: FoldContext, node: fx.Node) -> Expr:
    """``out = F.pad(x, pads); out[strip] = v`` for each side's strip, ``v`` one constant per channel
    (DBB's ``BNAndPad``: the BN's value for a zero input, written into the border): the pad with
    border ``v``, the last write's node; exact after an op whose bias is ``v`` (:func:`_pad_step`)."""
    if any(user.target is assign for user in node.users):
        raise NotLinear()  # not the last write: the last one reads the whole chain
    writes, pad = [node], node.args[0]
    while isinstance(pad, fx.Node) and pad.target is assign:
        writes.append(pad)
        pad = pad.args[0]
    _require(isinstance(pad, fx.Node) and pad.target is F.pad and _rank(node) == 4)
    bound = bind(cast(fx.Node, pad))
    _require(bound["mode"] == "constant" and _static(bound["pad"]) and len(bound["pad"]) in (2, 4))
    left, right, top, bottom = (list(bound["pad"]) + [0, 0])[:4]
    height, width = cast(tuple[int, ...], shape(node))[2:]
    sides = {(2, 0, top), (2, height - bottom, height), (3, 0, left), (3, width - right, width)}
    strips = {_strip(write.args[1], height, width) for write in writes}
    values = [channel_vector(node, context.constants.operand(write.args[2])) for write in writes]
    reason = "item assignment that is not a per-channel constant on each side of a pad's border"
    _require(strips == {side for side in sides if side[1] < side[2]} and values[0] is not None, reason)
    value = cast(Tensor, values[0])
    _require(all(v is not None and torch.equal(v, value) for v in values), reason)
    step = _pad_step(context, [left, right, top, bottom], value)
    return context.chain(node, bound["input"], step, via=[cast(fx.Node, pad), *reversed(writes[1:])])


_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_pool(context: FoldContext, node: fx.Node, bound: dict[str, Any]) -> Expr:
    _require(_rank(node) == 4 and _static(*(bound[k] for k in _POOL_ARGUMENTS[:5])))
    padded = algebra.pair(bound["padding"]) != (0, 0)
    own_divisor = bound["ceil_mode"] or (padded and not bound["count_include_pad"])
    _require(
        not own_divisor and bound["divisor_override"] is None,
        "only avg-pool with ceil_mode=False and, when it pads, count_include_pad=True "
        "folds (otherwise border windows have their own divisor)",
    )

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        meta = node.meta["tensor_meta"]  # pooling keeps the channels
        sizes = (bound["kernel_size"], bound["stride"] or None, bound["padding"])
        pool = algebra.avg_pool(meta.shape[1], *sizes, dtype=meta.dtype, device=context.constants.device)
        return pool if previous is None else algebra.sequential(previous, pool)

    kh, kw = algebra.pair(bound["kernel_size"])
    return context.chain(node, bound["input"], step, numel(node) * kh * kw)  # each output sums kh * kw inputs


def avg_pool_module(context: FoldContext, node: fx.Node) -> Expr:
    module = context.module(node)
    bound = {name: getattr(module, name) for name in _POOL_ARGUMENTS}
    return _avg_pool(context, node, {**bound, "input": _input(node)})


def avg_pool_function(context: FoldContext, node: fx.Node) -> Expr:
    return _avg_pool(context, node, bind(node))


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


def crop(context: FoldContext, node: fx.Node) -> Expr:
    """``x[:, :, c:-c, :]`` and the like (ACNet's crop before a 1xk conv): a shift the next conv absorbs."""
    rows_cols = _symmetric_crop(node.args[1]) if len(node.args) == 2 and _rank(node) == 4 else None
    if rows_cols is None:
        raise NotLinear()

    def step(previous: ConvOp | None, anchor: fx.Node) -> ConvOp:
        meta = node.meta["tensor_meta"]
        op = algebra.crop(meta.shape[1], *rows_cols, dtype=meta.dtype, device=context.constants.device)
        return op if previous is None else algebra.sequential(previous, op)

    return context.chain(node, node.args[0], step)


# --- arithmetic ---------------------------------------------------------------------------------------


def channel_vector(node: fx.Node, constant: Tensor | None) -> Tensor | None:
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
        vector = channel_vector(node, context.constants.operand(constant))
        if vector is not None:
            return variable, vector, is_left
    return None


def _add(context: FoldContext, node: fx.Node, subtract: bool) -> Expr:
    """Branches of one anchor add up; ``x + c`` with a per-channel constant shifts the bias."""
    _require(not node.kwargs)  # alpha=..., out=...
    split = _split_constant(context, node)
    if split is not None:
        variable, constant, is_left = split
        factor = -1.0 if subtract and not is_left else 1.0  # c - x
        shift = -constant if subtract and is_left else constant  # x - c
        return context.chain(node, variable, context.affine(torch.tensor(factor), shift))
    left, right = node.args[0], node.args[1]
    _require(isinstance(left, fx.Node) and isinstance(right, fx.Node))
    _require(shape(left) == shape(right) == shape(node))  # not broadcasting
    return context.add_branches(node, cast(fx.Node, left), cast(fx.Node, right), -1.0 if subtract else 1.0)


def add(context: FoldContext, node: fx.Node) -> Expr:
    return _add(context, node, subtract=False)


def subtract(context: FoldContext, node: fx.Node) -> Expr:
    return _add(context, node, subtract=True)


def _scale(context: FoldContext, node: fx.Node, divide: bool) -> Expr:
    """``x * c`` / ``x / c`` with ``c`` a constant scalar or per-channel tensor."""
    split = _split_constant(context, node)
    if split is None or node.kwargs or (divide and not split[2]):
        raise NotLinear()
    variable, factor, _ = split
    return context.chain(node, variable, context.affine(1.0 / factor if divide else factor, None))


def multiply(context: FoldContext, node: fx.Node) -> Expr:
    return _scale(context, node, divide=False)


def divide(context: FoldContext, node: fx.Node) -> Expr:
    return _scale(context, node, divide=True)


def negate(context: FoldContext, node: fx.Node) -> Expr:
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
    assign: border_fill,
}
