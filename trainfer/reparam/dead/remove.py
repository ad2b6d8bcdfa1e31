"""Dead-channel removal: which channels go (all-or-nothing classes), and the rewrite of the layers.

Channels are linked into *classes* that must go together: a channel-wise op links channel ``c`` of
each input to channel ``c`` of its output (a residual add links both addends: a channel leaves a
sum only when it leaves every addend); ``cat`` and ``flatten`` link with their offsets (one channel
is ``H*W`` features of the flattened value). A class is removed when

- every channel in it is made by a layer's filter or by one of those links (never by an input,
  a constant tensor, or an op this pass does not know: those keep their channels), and
- wherever its values leave the class (a conv or linear reading them), each is either provably the
  constant ``k`` (:mod:`~trainfer.reparam.dead.bounds`), which the reader absorbs into its bias as
  ``k * sum(W[:, c])`` -- only where the reader does not read zero padding, or ``k = 0``, since a
  padded border sees part of the constant -- or unused (the reader's weights on it are all zero);
  values read by anything else (the output, an unknown op) keep their class.

Then every value keeps at least one channel, and a grouped conv loses the same number of input and
output channels in every group (else its channels all stay), until nothing changes. Each
affected conv, linear, depthwise conv and BatchNorm is rebuilt with the kept channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.reparam.dead.bounds import Bounds, channel_bounds, constant, zero_padded
from trainfer.reparam.dead.graph import Role, classify, width
from trainfer.reparam.fold.shapes import propagate_shapes, shape

__all__ = ["DeadChannelReport", "remove_dead_channels"]

_LINKS = ("channelwise", "cat", "flatten")


@dataclass
class DeadChannelReport:
    """What :func:`remove_dead_channels` removed: per layer, and the multiply-adds and parameters saved."""

    layers: list[str] = field(default_factory=list)
    macs: tuple[int, int] = (0, 0)
    parameters: tuple[int, int] = (0, 0)

    @property
    def removed(self) -> int:
        """How many layers changed width."""
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "macs": list(self.macs), "parameters": list(self.parameters)}

    def __str__(self) -> str:
        (m0, m1), (p0, p1) = self.macs, self.parameters
        head = f"dead channels: MACs {m0} -> {m1}, parameters {p0} -> {p1}"
        return "\n".join([head, *(f"  - {line}" for line in self.layers)])


def remove_dead_channels(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> DeadChannelReport:
    """Remove ``gm``'s dead channels in place (see the module docstring); ``inputs`` drive shapes.

    Returns the report; ``gm`` is recompiled. Exact in real arithmetic: the float64 fold checks verify it.
    """
    propagate_shapes(gm, inputs)
    report = DeadChannelReport(macs=(_macs(gm), 0), parameters=(_parameters(gm), 0))
    roles = classify(gm)
    bounds = channel_bounds(gm, roles)
    classes = _Classes(gm, roles)
    kept = _settle(classes, roles, _kept_atoms(classes, roles, bounds))
    keep = {node: [c for c in range(classes.width[node]) if classes.find(classes.atom(node, c)) in kept]
            for node in classes.width}  # fmt: skip
    for node, role in roles.items():
        if role.module is not None and len(keep[node]) < classes.width[node] or _narrower_input(role, keep, classes):
            report.layers.append(_rebuild(gm, node, role, keep, bounds))
    gm.recompile()
    propagate_shapes(gm, inputs)
    report.macs = (report.macs[0], _macs(gm))
    report.parameters = (report.parameters[0], _parameters(gm))
    return report


def _narrower_input(role: Role, keep: dict[fx.Node, list[int]], classes: _Classes) -> bool:
    return role.kind == "layer" and len(keep[role.inputs[0]]) < classes.width[role.inputs[0]]


class _Classes:
    """Union-find over (node, channel) atoms, linked by the channel-wise ops, ``cat`` and ``flatten``."""

    def __init__(self, gm: fx.GraphModule, roles: dict[fx.Node, Role]) -> None:
        self.offset: dict[fx.Node, int] = {}
        self.width: dict[fx.Node, int] = {}
        total = 0
        for node in gm.graph.nodes:
            size = width(node)
            if size is not None:
                self.offset[node], self.width[node], total = total, size, total + size
        self.parent = list(range(total))
        for node, role in roles.items():
            self._link(node, role)

    def atom(self, node: fx.Node, channel: int) -> int:
        return self.offset[node] + channel

    def atoms(self, node: fx.Node) -> range:
        return range(self.offset[node], self.offset[node] + self.width[node])

    def find(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def _link(self, node: fx.Node, role: Role) -> None:
        if role.kind == "channelwise":
            for source in role.inputs:
                for a, b in zip(self.atoms(source), self.atoms(node), strict=True):
                    self.union(a, b)
        elif role.kind == "cat":
            outputs = iter(self.atoms(node))
            for source in role.inputs:
                for a in self.atoms(source):
                    self.union(a, next(outputs))
        elif role.kind == "flatten":
            area = self.width[node] // self.width[role.inputs[0]]
            for c, a in enumerate(self.atoms(role.inputs[0])):
                for b in range(self.atom(node, c * area), self.atom(node, (c + 1) * area)):
                    self.union(a, b)


def _kept_atoms(classes: _Classes, roles: dict[fx.Node, Role], bounds: dict[fx.Node, Bounds]) -> set[int]:
    """Atoms whose class must stay: made by what cannot drop a channel, or read where removal is not exact."""
    kept: set[int] = set()
    for node, role in roles.items():
        if node in classes.width and role.kind not in ("layer", *_LINKS):
            kept.update(classes.atoms(node))
        for source in node.all_input_nodes:
            if source not in classes.width or (role.kind in _LINKS and source in role.inputs) or role.kind == "size0":
                continue
            if role.kind == "layer" and source is role.inputs[0] and node.args == (source,):
                kept.update(classes.atom(source, c) for c in _unabsorbable(role.module, bounds[source]))
            else:
                kept.update(classes.atoms(source))
    return {classes.find(atom) for atom in kept}


def _unabsorbable(layer: Any, source: Bounds) -> list[int]:
    """Input channels ``layer`` reads that are neither unused nor a constant it can absorb into its bias."""
    weight = _weight(layer)
    unused = _input_weight_sums(weight, _groups(layer), lambda w: w.abs()) == 0
    absorbable = constant(source) & ((source[0] == 0) | (not zero_padded(layer)))
    return [c for c in range(len(unused)) if not (unused[c] or absorbable[c])]


def _weight(layer: Any) -> Tensor:
    weight = layer.weight.detach()
    return weight if weight.dim() == 4 else weight[:, :, None, None]


def _groups(layer: Any) -> int:
    return int(getattr(layer, "groups", 1))


def _input_weight_sums(weight: Tensor, groups: int, f: Any = None) -> Tensor:
    """Per input channel ``c``: the sum of ``f(W)`` over the filters reading it and their taps."""
    values = f(weight) if f is not None else weight
    per_group = values.shape[1]
    outputs = values.shape[0] // groups
    sums = values.flatten(2).sum(2).reshape(groups, outputs, per_group).sum(1)
    return sums.reshape(-1)


def _settle(classes: _Classes, roles: dict[fx.Node, Role], kept: set[int]) -> set[int]:
    """``kept`` grown until every value keeps a channel and grouped convs stay uniform; the kept class roots."""
    while True:
        grown = set(kept)
        for node in classes.width:
            roots = [classes.find(a) for a in classes.atoms(node)]
            if not any(root in grown for root in roots):
                grown.add(roots[0])
        for node, role in roles.items():
            if role.kind == "layer" and _groups(role.module) > 1:
                _uniform_groups(classes, [role.inputs[0], node], _groups(role.module), grown)
        if grown == kept:
            return kept
        kept = grown


def _uniform_groups(classes: _Classes, nodes: list[fx.Node], groups: int, kept: set[int]) -> None:
    """Keep all channels of ``nodes`` unless each loses the same number in every group."""
    for node in nodes:
        removed = [classes.find(a) not in kept for a in classes.atoms(node)]
        size = len(removed) // groups
        if len({sum(removed[g * size : (g + 1) * size]) for g in range(groups)}) > 1:
            for other in nodes:
                kept.update(classes.find(a) for a in classes.atoms(other))
            return


# --------------------------------------------------------------------------- rewrite
def _rebuild(
    gm: fx.GraphModule, node: fx.Node, role: Role, keep: dict[fx.Node, list[int]], bounds: dict[fx.Node, Bounds]
) -> str:
    """Replace ``node``'s module by one with the kept channels; the line of the report."""
    module, name = role.module, str(node.target)
    outputs = keep[node]
    if isinstance(module, _BatchNorm):
        new: nn.Module = _sliced_batch_norm(module, outputs)
    elif role.kind == "channelwise":
        bias = _bias(module)[outputs] if module.bias is not None else None
        new = _new_layer(module, _weight(module)[outputs], bias, len(outputs), groups=len(outputs))
    else:
        new = _narrowed_layer(module, keep[role.inputs[0]], outputs, bounds[role.inputs[0]])
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent), child, new)
    line = f"{name}: {_width(module)} -> {_width(new)}"
    removed = sorted(set(range(_out(module))) - set(outputs))
    return line + (f" (removed output channels {_brief(removed)})" if removed else "")


def _width(module: Any) -> str:
    if isinstance(module, _BatchNorm):
        return f"{module.num_features} channels"
    if isinstance(module, nn.Linear):
        return f"{module.in_features}x{module.out_features}"
    return f"{module.in_channels}x{module.out_channels}"


def _out(module: Any) -> int:
    if isinstance(module, _BatchNorm):
        return module.num_features
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _brief(channels: list[int]) -> str:
    return str(channels) if len(channels) <= 12 else f"{channels[:12]}... ({len(channels)})"


def _bias(module: Any) -> Tensor:
    bias = module.bias
    weight = module.weight
    return bias.detach() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def _narrowed_layer(module: Any, inputs: list[int], outputs: list[int], source: Bounds) -> nn.Module:
    """A conv/linear reading only ``inputs`` and making only ``outputs``; removed constant inputs go into the bias."""
    weight, groups = _weight(module), _groups(module)
    per_group, per_out = weight.shape[1], weight.shape[0] // groups
    values = torch.where(constant(source), source[0], 0.0).to(weight.dtype)
    removed = torch.ones(len(values), dtype=torch.bool)
    removed[inputs] = False
    # bias[o] += sum over removed inputs i of o's group: k_i * sum_taps W[o, i]
    grouped = (values * removed).reshape(groups, 1, per_group)
    sums = weight.flatten(2).sum(2).reshape(groups, per_out, per_group)
    bias = _bias(module) + (sums * grouped).sum(2).reshape(-1)
    rows, columns = [], []
    for g in range(groups):
        rows += [o for o in outputs if o // per_out == g]
        columns.append([i - g * per_group for i in inputs if i // per_group == g])
    narrowed = torch.cat([weight[[o for o in outputs if o // per_out == g]][:, columns[g]] for g in range(groups)])
    has_bias = module.bias is not None or bool((bias != 0).any())
    return _new_layer(module, narrowed, bias[rows] if has_bias else None, len(inputs), groups=groups)


def _new_layer(module: Any, weight: Tensor, bias: Tensor | None, inputs: int, groups: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        layer: Any = nn.Linear(inputs, weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        weight = weight[:, :, 0, 0]
    else:
        conv = module
        layer = nn.Conv2d(inputs, weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          groups, bias is not None, conv.padding_mode, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(module.training)


def _sliced_batch_norm(bn: _BatchNorm, channels: list[int]) -> _BatchNorm:
    new: Any = type(bn)(len(channels), bn.eps, bn.momentum, bn.affine, bn.track_running_stats, dtype=bn.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(bn, name)[channels])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


# --------------------------------------------------------------------------- counts
def _macs(gm: fx.GraphModule) -> int:
    """Multiply-adds per sample of the convs and linears ``gm`` calls (shapes from ``tensor_meta``)."""
    total = 0
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        dims = shape(node)
        if isinstance(module, nn.Conv2d | nn.Linear) and dims:
            per_output = module.weight[0].numel()
            total += int(torch.Size(dims[1:]).numel()) * per_output
    return total


def _parameters(gm: fx.GraphModule) -> int:
    return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())
