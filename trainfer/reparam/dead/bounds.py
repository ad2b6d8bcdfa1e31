"""Per-channel bounds of every value of a folded graph: the proof that a channel is constant.

:func:`channel_bounds` runs interval arithmetic forward over the graph: for each node with
channels (:func:`~trainfer.reparam.dead.graph.width`), ``lo[c] <= x[n, c, ...] <= hi[c]`` for every
input the graph may be given (inputs are unbounded). A channel with ``lo == hi`` is the constant
``lo``. The rules, for finite inputs:

- conv / linear ``y = b + sum W x``: ``lo_y = b + sum(W+ lo_x + W- hi_x)`` (``W+``/``W-`` the positive
  and negative parts summed over the kernel taps, a zero weight reading nothing, even from an
  unbounded channel); zero padding adds 0 to what the kernel may read, so a constant ``k != 0``
  stops being constant where the padding is read (the border);
- BatchNorm (eval) ``y = s x + t``: bounds scaled (swapped when ``s < 0``); ``gamma = 0`` gives ``t``;
- monotone activations map the bounds (``relu`` of a value provably ``<= 0`` is the constant 0);
  other activations map constants only; max pools and spatial means keep the bounds, average pools
  reading zero padding add 0;
- ``+``, ``-``, ``*``: interval arithmetic (``0 * inf = 0``: a provably zero factor zeroes the product);
- ``cat``, ``flatten``: the bounds rearranged with the channels.

Bounds are computed in float64; a bound on a sum of non-zero terms may be off by its rounding
(relative 1e-16), which is what a channel removed on a bound of exactly 0 can change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam.dead.graph import MONOTONE_FUNCTIONS, MONOTONE_METHODS, MONOTONE_MODULES, Role, width
from trainfer.reparam.fold.calls import bind
from trainfer.reparam.fold.shapes import shape

__all__ = ["Bounds", "channel_bounds", "constant", "convolution_bounds", "zero_padded"]

Bounds = tuple[Tensor, Tensor]


def channel_bounds(gm: fx.GraphModule, roles: dict[fx.Node, Role]) -> dict[fx.Node, Bounds]:
    """``(lo, hi)`` (float64, one entry per channel) for every node of ``gm`` that has channels."""
    bounds: dict[fx.Node, Bounds] = {}
    for node in gm.graph.nodes:
        size = width(node)
        if size is not None:
            bounds[node] = _checked(_bounds(gm, node, roles[node], bounds), size)
    return bounds


def constant(bounds: Bounds) -> Tensor:
    """Which channels are provably one finite constant (``lo == hi``)."""
    lo, hi = bounds
    return (lo == hi) & lo.isfinite()


def _unknown(size: int) -> Bounds:
    return torch.full((size,), -torch.inf, dtype=torch.float64), torch.full((size,), torch.inf, dtype=torch.float64)


def _checked(bounds: Bounds | None, size: int) -> Bounds:
    if bounds is None or bounds[0].shape != (size,):
        return _unknown(size)
    return bounds


def _bounds(gm: fx.GraphModule, node: fx.Node, role: Role, known: dict[fx.Node, Bounds]) -> Bounds | None:
    if role.kind in ("barrier", "size0") or any(source not in known for source in role.inputs):
        return None
    inputs = [known[source] for source in role.inputs]
    if role.kind == "cat":
        return torch.cat([b[0] for b in inputs]), torch.cat([b[1] for b in inputs])
    if role.kind == "flatten":
        area = int(torch.Size((shape(role.inputs[0]) or ())[2:]).numel())
        return inputs[0][0].repeat_interleave(area), inputs[0][1].repeat_interleave(area)
    if role.kind == "layer" or isinstance(role.module, nn.Conv2d):
        return convolution_bounds(_layer_weight(role.module), role.module.bias, _groups(role.module),
                                  inputs[0], zero_padded(role.module))  # fmt: skip
    if isinstance(role.module, _BatchNorm):
        return _batch_norm_bounds(role.module, inputs[0])
    if role.binary:
        return _binary_bounds(node, known)
    return _unary_bounds(gm, node, inputs[0])


def _layer_weight(module: Any) -> Tensor:
    weight = module.weight.detach().double()
    return weight if weight.dim() == 4 else weight[:, :, None, None]


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def zero_padded(module: nn.Module | None) -> bool:
    """Whether a conv reads zero padding (a constant input channel is then not constant at the border)."""
    if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
        return False
    if module.padding == "same":
        return any(k > 1 for k in module.kernel_size)
    return module.padding != "valid" and any(int(p) > 0 for p in module.padding)


def _times(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` with ``0 * inf = 0`` (a provably zero factor, or a zero weight, zeroes the product)."""
    return torch.where((a == 0) | (b == 0), torch.zeros((), dtype=a.dtype), a * b)


def convolution_bounds(weight: Tensor, bias: Tensor | None, groups: int, source: Bounds, padded: bool) -> Bounds:
    """Bounds of ``conv(x, weight, bias, groups)`` (``weight``: ``(out, in/groups, kh, kw)``), ``x`` in ``source``.

    Finite parts are matrix-vector products per group; a bound is infinite where a non-zero weight
    of the right sign reads an infinite bound (``lo`` is finite or -inf, ``hi`` finite or +inf).
    """
    lo, hi = source
    if padded:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    positive = weight.clamp(min=0).flatten(2).sum(2)
    negative = weight.clamp(max=0).flatten(2).sum(2)
    outputs = positive.shape[0]
    offset = bias.detach().double() if bias is not None else torch.zeros(outputs, dtype=torch.float64)

    def total(w: Tensor, x: Tensor) -> Tensor:
        """``sum_i w[o, i] x[i]`` over the inputs of ``o``'s group."""
        per_group = w.shape[1]
        return torch.bmm(w.reshape(groups, -1, per_group), x.reshape(groups, per_group, 1)).reshape(outputs)

    def reaches(w: Tensor, infinite: Tensor) -> Tensor:
        return total((w != 0).double(), infinite.double()) > 0

    low_lo, high_hi = torch.where(lo.isinf(), 0.0, lo), torch.where(hi.isinf(), 0.0, hi)
    low = offset + total(positive, low_lo) + total(negative, high_hi)
    high = offset + total(positive, high_hi) + total(negative, low_lo)
    low = torch.where(reaches(positive, lo.isinf()) | reaches(negative, hi.isinf()), -torch.inf, low)
    high = torch.where(reaches(positive, hi.isinf()) | reaches(negative, lo.isinf()), torch.inf, high)
    return low, high


def _batch_norm_bounds(bn: Any, source: Bounds) -> Bounds:
    """``y = s x + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - s mean`` (exactly ``beta`` when gamma = 0)."""
    scale = bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()
    shift = bn.bias.detach().double() - _times(scale, bn.running_mean.double())
    return _interval_sum((shift, shift), _product((scale, scale), source))


def _product(a: Bounds, b: Bounds) -> Bounds:
    corners = torch.stack([_times(x, y) for x in a for y in b])
    return corners.amin(0), corners.amax(0)


def _interval_sum(a: Bounds, b: Bounds) -> Bounds:
    return a[0] + b[0], a[1] + b[1]


def _operand(value: Any, known: dict[fx.Node, Bounds], size: int) -> Bounds:
    if isinstance(value, fx.Node):
        return known[value]
    number = torch.full((size,), float(value), dtype=torch.float64)
    return number, number


def _binary_bounds(node: fx.Node, known: dict[fx.Node, Bounds]) -> Bounds:
    size = width(node) or 0
    a, b = (_operand(value, known, size) for value in node.args[:2])
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if "mul" in name:
        return _product(a, b)
    if "sub" in name:
        b = (-b[1], -b[0])
    return _interval_sum(a, b)


def _unary_bounds(gm: fx.GraphModule, node: fx.Node, source: Bounds) -> Bounds | None:
    """Activations (monotone: both bounds; others: constants only), pools, means, identities."""
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    monotone = isinstance(module, MONOTONE_MODULES) or node.target in (*MONOTONE_FUNCTIONS, *MONOTONE_METHODS)
    if _is_activation(node, module):
        if not monotone and not bool(constant(source).all()):
            return _mask_unknown(_apply(node, module, source), constant(source))
        return _apply(node, module, source)
    if _reads_zero_padding(node, module):
        return source[0].clamp(max=0), source[1].clamp(min=0)
    return source


def _is_activation(node: fx.Node, module: nn.Module | None) -> bool:
    passing = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool2d)  # fmt: skip
    if module is not None:
        return not isinstance(module, passing)
    pools = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, torch.mean)
    return node.target not in pools and node.target not in ("mean", "contiguous")


def _reads_zero_padding(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.AvgPool2d):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        return module.count_include_pad and any(p > 0 for p in padding)
    if node.target is F.avg_pool2d:
        arguments = bind(node)
        given = arguments["padding"]
        return bool(arguments["count_include_pad"]) and any(
            p > 0 for p in (given if isinstance(given, tuple | list) else (given,))
        )
    return False


def _apply(node: fx.Node, module: nn.Module | None, source: Bounds) -> Bounds | None:
    """The activation applied to both bounds at once (a ``(2, C, 1, ...)`` tensor), sorted per channel."""
    rank = len(shape(node) or ())
    values = torch.stack(source).reshape(2, -1, *[1] * (rank - 2)).clone()
    extra = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(a, fx.Node) for a in extra):
        return None
    with torch.no_grad():
        if module is not None:
            result = module(values)
        elif node.op == "call_method":
            result = getattr(values, str(node.target))(*node.args[1:], **node.kwargs)
        else:
            function: Any = node.target
            result = function(values, *node.args[1:], **node.kwargs)
    result = result.reshape(2, -1).double()
    return result.amin(0), result.amax(0)


def _mask_unknown(bounds: Bounds | None, known: Tensor) -> Bounds | None:
    if bounds is None:
        return None
    lo, hi = bounds
    return torch.where(known, lo, -torch.inf), torch.where(known, hi, torch.inf)
