"""Cross-layer equalization (Nagel et al. 2019): exact rescaling that makes kernels int8-friendly.

A folded RepVGG kernel carries per-channel outliers (identity branch and BatchNorm scales land in
one kernel), and per-tensor activation ranges then waste most of the int8 grid. For two layers
joined by a positively homogeneous activation ``f`` (ReLU, LeakyReLU: ``f(x / s) = f(x) / s``
for ``s > 0``),

    B(f(A x + a)) = B'(f(A' x + a'))   with  A'[i] = A[i] / s_i,  a'[i] = a[i] / s_i,  B'[:, i] = B[:, i] s_i

holds exactly for any positive ``s``; zero padding of ``B`` stays zero. Choosing
``s_i = sqrt(r_A,i / r_B,i)`` (``r_A,i = max |A[i]|``, ``r_B,i = max |B[:, i]|``) gives both
layers the same range ``sqrt(r_A,i r_B,i)`` per channel. Sweeps over the chain repeat because
each middle layer is the ``B`` of one pair and the ``A`` of the next.

``B`` may be a (grouped) conv reading the activation directly, or a Linear reached through a
global average pool and a flatten (both commute with per-channel scaling). Like every fold, the
transform runs on a float64 copy, is verified there against the original (1e-9) and in the
model's dtype (its tolerance); a mismatch raises :class:`trainfer.EquivalenceError`.

Bias absorption (Nagel's second step) moves part of ``a`` into the next layer's bias; it is exact
only where the pre-activation provably stays above the moved amount, which depends on the data,
so it is not applied here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from trainfer.errors import EquivalenceError, InputError
from trainfer.numerics import TOLERANCE
from trainfer.recipe import attach_recipe, recipe_of
from trainfer.reparam.verify import Equivalence, as_arguments, model_dtype, verify

__all__ = ["EqualizedPair", "EqualizationReport", "equalize", "find_pairs"]

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu}


@dataclass
class EqualizedPair:
    """Two layers rescaled against each other, and how uneven their per-channel ranges were and are."""

    first: str
    second: str
    channels: int
    spread_before: float
    spread_after: float
    scale_min: float = 1.0
    scale_max: float = 1.0

    def __str__(self) -> str:
        return (
            f"{self.first} -> {self.second}: {self.channels} channels, per-channel range spread (max/min of "
            f"{self.first}) {self.spread_before:.1f} -> {self.spread_after:.1f}, "
            f"scales {self.scale_min:.3g}..{self.scale_max:.3g}"
        )


@dataclass
class EqualizationReport:
    """What :func:`equalize` rescaled, over how many sweeps, and the float64/model-dtype verification."""

    pairs: list[EqualizedPair] = field(default_factory=list)
    sweeps: int = 0
    verification: dict[str, Equivalence] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"cross-layer equalization: {len(self.pairs)} layer pairs, {self.sweeps} sweeps"]
        lines += [f"  {pair}" for pair in self.pairs]
        lines += [f"  verification ({k}): max rel error {v.max_rel_error:.2e}" for k, v in self.verification.items()]
        return "\n".join(lines)


Layer = nn.Conv2d | nn.Linear


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module a ``call_module`` node calls (its target is the module's name), else None."""
    return modules[node.target] if node.op == "call_module" and isinstance(node.target, str) else None


def _is_homogeneous(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(_module(node, modules), _HOMOGENEOUS_MODULES)
    return node.op in ("call_function", "call_method") and (
        node.target in _HOMOGENEOUS_FUNCTIONS or node.target in ("relu", "relu_")
    )


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    pool = _module(node, modules)
    return isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1))


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        flatten = _module(node, modules)
        return isinstance(flatten, nn.Flatten) and flatten.start_dim == 1
    return node.op == "call_function" and node.target is torch.flatten and node.args[1:2] == (1,)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _follower(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The layer that alone reads activation ``node`` channel by channel: a conv, or a Linear after pool+flatten."""
    user = _single_user(node)
    if user is None or not isinstance(user.target, str):
        return None
    if isinstance(_module(user, modules), nn.Conv2d) and user.args[0] is node:
        return user.target
    if _is_global_pool(user, modules):
        flat = _single_user(user)
        if flat is not None and _is_flatten(flat, modules):
            linear = _single_user(flat)
            if (
                linear is not None
                and isinstance(linear.target, str)
                and isinstance(_module(linear, modules), nn.Linear)
            ):
                return linear.target
    return None


def find_pairs(graph_module: fx.GraphModule) -> list[tuple[str, str]]:
    """``(first, second)`` module names joined by one positively homogeneous activation and nothing else."""
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        conv, first = _module(node, modules), node.target
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or not isinstance(first, str):
            continue
        activation = _single_user(node)
        if activation is None or not _is_homogeneous(activation, modules) or activation.args[0] is not node:
            continue
        second = _follower(activation, modules)
        if second is not None:
            pairs.append((first, second))
    return pairs


def _input_view(layer: Layer) -> Tensor:
    """``layer``'s weight as ``(groups, out/groups, in/groups, ...)``: in-channel ``c`` is ``[c // n, :, c % n]``."""
    weight = layer.weight
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _output_ranges(layer: nn.Conv2d) -> Tensor:
    return layer.weight.detach().abs().flatten(1).amax(1)


def _input_ranges(layer: Layer) -> Tensor:
    view = _input_view(layer).detach().abs()  # (g, out/g, in/g, ...)
    return view.transpose(1, 2).flatten(2).amax(2).flatten()  # (g * in/g,)


def _spread(ranges: Tensor) -> float:
    positive = ranges[ranges > 0]
    return float(positive.max() / positive.min()) if positive.numel() else 1.0


@torch.no_grad()
def _rescale(first: nn.Conv2d, second: Layer) -> Tensor:
    """Apply ``s = sqrt(r_first / r_second)`` in place; return ``s``."""
    r1, r2 = _output_ranges(first), _input_ranges(second)
    scale = torch.where((r1 > 0) & (r2 > 0), (r1 / r2.clamp_min(1e-300)).sqrt(), torch.ones_like(r1))
    first.weight.div_(scale.reshape(-1, *[1] * (first.weight.dim() - 1)))
    if first.bias is not None:
        first.bias.div_(scale)
    view = _input_view(second)
    groups, per_group = view.shape[0], view.shape[2]
    factor = scale.reshape(groups, 1, per_group, *[1] * (view.dim() - 3))
    second.weight.copy_((view * factor).reshape(second.weight.shape))
    return scale


def _pair_layers(modules: dict[str, nn.Module], names: tuple[str, str]) -> tuple[nn.Conv2d, Layer]:
    """The two layers of a pair from :func:`find_pairs` (a conv, then a conv or a Linear), checked to fit."""
    first, second = modules[names[0]], modules[names[1]]
    if not isinstance(first, nn.Conv2d) or not isinstance(second, Layer):
        raise InputError(f"{names[0]} -> {names[1]} is not a conv followed by a conv or Linear")
    channels = first.out_channels
    expected = second.in_channels if isinstance(second, nn.Conv2d) else second.in_features
    if channels != expected:  # a Linear after pooling reads one feature per channel
        raise InputError(f"{names[0]} has {channels} output channels but {names[1]} reads {expected}")
    return first, second


def equalize(
    model: nn.Module, example_inputs: Any, *, sweeps: int = 4, verify_result: bool = True
) -> tuple[fx.GraphModule, EqualizationReport]:
    """An equalized copy of ``model`` (an FX graph; the input is untouched) and the report.

    ``sweeps``: passes over all pairs. Raises :class:`trainfer.EquivalenceError` if the result
    does not compute the same function (float64 at 1e-9, the model's dtype at its tolerance).
    """
    arguments = as_arguments(example_inputs)
    dtype = model_dtype(model)
    source = copy.deepcopy(model).eval()
    traced = source if isinstance(source, fx.GraphModule) else fx.symbolic_trace(source)
    working = copy.deepcopy(traced).double()
    modules = dict(working.named_modules())
    names = find_pairs(working)
    report = EqualizationReport(sweeps=sweeps if names else 0)
    layers = {pair: _pair_layers(modules, pair) for pair in names}
    before = {pair: _spread(_output_ranges(first)) for pair, (first, _) in layers.items()}
    scales = {pair: torch.ones(first.out_channels, dtype=torch.float64) for pair, (first, _) in layers.items()}
    for _ in range(report.sweeps):
        for pair in names:
            scales[pair] = scales[pair] * _rescale(*layers[pair])
    for pair in names:
        s = scales[pair]
        after = _spread(_output_ranges(layers[pair][0]))
        report.pairs.append(EqualizedPair(*pair, len(s), before[pair], after, float(s.min()), float(s.max())))
    result = copy.deepcopy(working).to(dtype)
    attach_recipe(result, recipe_of(model))
    if hasattr(model, "trainfer_report"):
        result.trainfer_report = copy.copy(model.trainfer_report)
    if verify_result:
        _verify(model, working, result, arguments, dtype, report)
    return result, report


def _verify(
    model: nn.Module, working: nn.Module, result: nn.Module, arguments: tuple, dtype: torch.dtype, report: Any
) -> None:
    checks: dict[str, tuple[nn.Module, torch.dtype, float | None]] = {
        "float64": (working, torch.float64, TOLERANCE[torch.float64])
    }
    if dtype != torch.float64:
        checks[str(dtype).removeprefix("torch.")] = (result, dtype, None)
    for label, (candidate, check_dtype, rtol) in checks.items():
        reference = model if check_dtype != torch.float64 else copy.deepcopy(model).double()
        report.verification[label] = verify(reference, candidate, arguments, rtol=rtol, dtypes=(check_dtype,))
        if not report.verification[label].ok:
            raise EquivalenceError(
                f"cross-layer equalization changed what the model computes ({label}): {report.verification[label]}",
                report,
            )
