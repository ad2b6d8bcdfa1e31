"""Structured (channel) pruning of a deploy form, accuracy-gated, with a per-layer sensitivity report.

:func:`prune` makes a model narrower, so that it really runs faster (masking weights, as
``torch.nn.utils.prune`` does, saves nothing):

1. it works on the **deploy form** (:func:`trainfer.deploy`; a deploy form or a bundle is taken as
   it is): re-parameterized blocks (RepVGG, MobileOne, ACNet, DBB) are single convs there, so their
   branches cannot be pruned inconsistently and the result is itself a deploy form;
2. **dependencies** come from Torch-Pruning's DepGraph: removing a filter also removes what reads
   that channel (the next conv's input channels, a depthwise conv's channel, the features a flatten
   makes of it), and channels joined by a residual add or a concat go together, as one *group*;
   the output layer keeps its outputs and the input keeps its channels;
3. **importance** of a group: the L2 norm (``importance="l2"``; ``"l1"``: the L1 norm) of every
   weight the group removes, summed over its layers (Torch-Pruning's ``GroupMagnitudeImportance``).
   In the deploy form each filter carries its folded BatchNorm scale, so this is the magnitude
   *and* BN-scale criterion in one number. The lowest-ranked ``ratio`` of each group's channels go
   (``global_pruning=True``: ranked across all layers instead), per layer overridable
   (``ratios={"layer.name": 0.3}``), rounded to multiples of ``round_to`` channels;
4. optional **fine-tuning**: ``finetune(model)`` trains the pruned form in place (the user's loop,
   or the demo's) before it is gated;
5. the **accuracy gate** (:class:`~trainfer.serve.gate.AccuracyGate`, as for int8: class or binary decision
   agreement with the unpruned form and accuracy drop on labelled data; for a regressor, its RMS error and
   MAE increase);
6. if the gate fails, **search**: each layer is pruned alone at its ratio and ranked by the damage
   (the per-layer sensitivity report), then the most sensitive layers are exempted one at a time
   until the gate passes; past ``max_exempt_layers`` it refuses with :class:`PruningError`.

The result is an ``nn.Module`` (a ``torch.fx.GraphModule`` in deploy form) with its report as
``trainfer_prune_report``: ``trainfer.save`` records its architecture (no pickle, no factory call on
load), and it goes on through ``trainfer.deploy``, ``trainfer.compile`` and ``trainfer.quantize``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, fx, nn

from trainfer.errors import InputError, PruningError
from trainfer.extras import require
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
from trainfer.serve.calibration import calibration_inputs
from trainfer.serve.gate import (
    AccuracyGate,
    GateOutput,
    GateReport,
    gate_labels,
    gate_output,
    gate_report,
    logits_over,
    warn_small_gate,
)
from trainfer.serve.source import check_class_gate, float32_copy, load_source

__all__ = ["LayerPruneSensitivity", "PruneReport", "PruningError", "prune"]

IMPORTANCE = {"l2": 2, "l1": 1}
_RANDOM_SAMPLES = 64


@dataclass
class LayerPruneSensitivity:
    """What pruning one layer alone (at its ratio, without fine-tuning) costs on the gate's data."""

    name: str
    agreement: float | None
    accuracy_drop: float | None
    #: :attr:`GateReport.damage <trainfer.serve.gate.GateReport.damage>`: higher = more sensitive.
    damage: float

    def __str__(self) -> str:
        agreement = "-" if self.agreement is None else f"{self.agreement:.2%}"
        drop = "-" if self.accuracy_drop is None else f"{100 * self.accuracy_drop:.2f}"
        return f"{self.name:<32}{agreement:>10}{drop:>10}{self.damage:>10.3g}"


@dataclass
class PruneReport:
    """The settings, what each layer became, the counts before/after, and the gate's verdict."""

    settings: dict[str, Any]
    gate: GateReport
    layers: list[str]
    macs: tuple[int, int]
    parameters: tuple[int, int]
    exempt: list[str] = field(default_factory=list)
    sensitivity: list[LayerPruneSensitivity] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "gate": self.gate.to_dict(),
            "layers": self.layers,
            "macs": list(self.macs),
            "parameters": list(self.parameters),
            "exempt": self.exempt,
            "sensitivity": [asdict(layer) for layer in self.sensitivity],
            "attempts": self.attempts,
        }

    def __str__(self) -> str:
        (m0, m1), (p0, p1) = self.macs, self.parameters
        lines = [f"pruned form: {self.gate}"]
        lines.append(
            f"MACs per sample {m0} -> {m1} ({m1 / max(m0, 1):.1%}), parameters {p0} -> {p1} ({p1 / max(p0, 1):.1%})"
        )
        lines.append(f"layers exempted from pruning: {', '.join(self.exempt) or 'none'}")
        lines += [f"  attempt: {attempt}" for attempt in self.attempts]
        lines += [f"  {line}" for line in self.layers]
        if self.sensitivity:
            lines.append(f"{'layer (most sensitive first)':<32}{'agreement':>10}{'drop pts':>10}{'damage':>10}")
            lines += [str(layer) for layer in self.sensitivity]
        return "\n".join(lines)


def prune(
    model_or_bundle: nn.Module | str,
    example_inputs: Tensor | None = None,
    *,
    ratio: float = 0.5,
    data: Any = None,
    labels: Tensor | None = None,
    gate: AccuracyGate | None = None,
    finetune: Callable[[nn.Module], Any] | None = None,
    ratios: Mapping[str, float] | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    importance: str = "l2",
    search: bool = True,
    max_exempt_layers: int | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """The gated, channel-pruned deploy form of ``model_or_bundle``; see the module docstring.

    ``ratio``: the fraction of each layer's channels removed (``0 <= ratio < 1``); ``ratios``
    overrides it per layer (deploy-form layer names, as the report prints them). ``data`` (inputs,
    in the forms :func:`trainfer.quantize` takes) and ``labels`` (class indices, 0/1 for a binary output, real
    targets for a regression output; :func:`~trainfer.serve.gate.gate_labels`) are what the gate measures on;
    without ``data``, random inputs of the example's shape (agreement, or a regression output's RMS error).
    ``finetune``: called with the pruned model (train mode) to train it in place. ``search=False``
    refuses as soon as the gate fails; ``max_exempt_layers`` bounds the search (default: half the layers).
    ``trust_factory`` is :func:`trainfer.load`'s, for a bundle whose factory is not registered.
    """
    settings = _settings(ratio, ratios, global_pruning, round_to, importance)
    gate = gate or AccuracyGate()
    source = load_source(model_or_bundle, example_inputs, trust_factory=trust_factory)
    check_class_gate(source.manifest, "trainfer.prune")
    output = gate_output(source.manifest)
    model, example = float32_copy(source.model), torch.randn(2, *source.sample_shape)
    inputs = (
        calibration_inputs(data, source.manifest)
        if data is not None
        else torch.randn(_RANDOM_SAMPLES, *source.sample_shape)
    )
    reference = logits_over(model, inputs)
    if data is not None:
        warn_small_gate(len(inputs))
    labels = gate_labels(labels, output, tuple(reference.shape), gate)
    run = _Run(model, example, inputs, labels, reference, (gate, output), settings, finetune)
    pruned, report = run.search(search, max_exempt_layers)
    pruned = attach_recipe(pruned, _pruned_recipe(model, example, settings))
    pruned.trainfer_prune_report = report
    return pruned


def _settings(
    ratio: float, ratios: Mapping[str, float] | None, global_pruning: bool, round_to: int | None, importance: str
) -> dict[str, Any]:
    for name, value in {"ratio": ratio, **{f"ratios[{k!r}]": v for k, v in (ratios or {}).items()}}.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
            raise InputError(f"{name} is the fraction of channels removed, 0 <= ratio < 1; got {value!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise InputError(f"round_to must be a positive int or None; got {round_to!r}")
    if importance not in IMPORTANCE:
        raise InputError(f"importance must be one of {sorted(IMPORTANCE)}; got {importance!r}")
    return {
        "ratio": float(ratio),
        "ratios": {str(k): float(v) for k, v in (ratios or {}).items()},
        "global_pruning": bool(global_pruning),
        "round_to": round_to,
        "importance": importance,
    }


def _pruned_recipe(model: nn.Module, example: Tensor, settings: dict[str, Any]) -> ModelRecipe:
    """The source's recipe as a deploy form whose options record the pruning (its widths are in the graph)."""
    recipe = recipe_of(model) or ModelRecipe(None, input_shape=tuple(example.shape))
    options = {**recipe.deploy_options, "pruned": settings}
    return replace(recipe, form="deploy", deploy_options=options)


def _layers(model: nn.Module) -> dict[str, Any]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _output_layers(model: nn.Module) -> set[str]:
    """Layers whose result the model returns directly (their outputs are the model's: never pruned)."""
    if not isinstance(model, fx.GraphModule):
        return {list(_layers(model))[-1]} if _layers(model) else set()
    outputs = {node for node in model.graph.nodes if node.op == "output"}
    return {str(node.target) for node in model.graph.nodes if node.op == "call_module" and set(node.users) & outputs}


def _macs_and_parameters(model: nn.Module, example: Tensor) -> tuple[int, int]:
    """Multiply-adds per sample and parameters, counted as ``trainfer bench`` and the demo's report count them
    (:func:`trainfer.bench.measure.count_macs`: convolutions and matrix products; element-wise ops and pooling
    are not multiply-adds of a weight), so the figures of every page agree."""
    from trainfer.bench.measure import count_macs, count_parameters

    with torch.no_grad():
        return count_macs(model, example[:1]), count_parameters(model)


@dataclass
class _Run:
    """One pruning job: prune with some layers exempt, fine-tune, gate; the sensitivity ranking; the search."""

    model: nn.Module
    example: Tensor
    inputs: Tensor
    labels: Tensor | None
    reference: Tensor
    gate: tuple[AccuracyGate, GateOutput]
    settings: dict[str, Any]
    finetune: Callable[[nn.Module], Any] | None
    attempts: list[str] = field(default_factory=list)

    def prunable(self) -> list[str]:
        exempt = _output_layers(self.model)
        return [name for name in _layers(self.model) if name not in exempt]

    def pruned(self, exempt: list[str], only: str | None = None) -> nn.Module:
        """A copy pruned at the settings' ratios, ``exempt`` layers untouched (``only``: that layer alone)."""
        tp = require("torch_pruning", "prune", "trainfer.prune")
        candidate = copy.deepcopy(self.model).float().eval()
        modules = dict(candidate.named_modules())
        names = [only] if only is not None else self.prunable()
        chosen = [n for n in names if n not in exempt]
        ratios = {modules[n]: self.settings["ratios"].get(n, self.settings["ratio"]) for n in chosen}
        ignored = [modules[n] for n in _layers(candidate) if n not in chosen]
        pruner = tp.pruner.MagnitudePruner(
            candidate,
            self.example,
            importance=tp.importance.GroupMagnitudeImportance(p=IMPORTANCE[self.settings["importance"]]),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=ignored,
            global_pruning=self.settings["global_pruning"],
            round_to=self.settings["round_to"],
        )
        pruner.step()
        return candidate

    def gated(self, candidate: nn.Module) -> GateReport:
        return gate_report(self.reference, logits_over(candidate, self.inputs), self.labels, *self.gate)

    def attempt(self, exempt: list[str]) -> tuple[nn.Module, GateReport]:
        candidate = self.pruned(exempt)
        if self.finetune is not None:
            candidate.train()
            self.finetune(candidate)
            candidate.eval()
        report = self.gated(candidate)
        self.attempts.append(f"{len(exempt)} layer(s) exempt{' (fine-tuned)' if self.finetune else ''}: {report}")
        return candidate, report

    def sensitivity(self) -> list[LayerPruneSensitivity]:
        """Each prunable layer pruned alone, most damaging first."""
        ranking = []
        for name in self.prunable():
            report = self.gated(self.pruned([], only=name))
            ranking.append(LayerPruneSensitivity(name, report.agreement, report.accuracy_drop, report.damage))
        return sorted(ranking, key=lambda layer: -layer.damage)

    def search(self, search: bool, max_exempt: int | None) -> tuple[nn.Module, PruneReport]:
        exempt: list[str] = []
        candidate, report = self.attempt(exempt)
        ranking = self.sensitivity() if not report.ok and search else []
        limit = len(ranking) // 2 if max_exempt is None else min(max_exempt, len(ranking))
        while not report.ok and len(exempt) < limit:
            exempt.append(ranking[len(exempt)].name)
            candidate, report = self.attempt(exempt)
        (m0, p0), (m1, p1) = (_macs_and_parameters(m, self.example) for m in (self.model, candidate))
        widths = _widths(self.model, candidate)
        result = PruneReport(self.settings, report, widths, (m0, m1), (p0, p1), exempt, ranking, self.attempts)
        if not report.ok:
            how = (
                f"with {len(exempt)} of {len(ranking)} layers exempt: {_why_stopped(len(ranking), max_exempt)}"
                if search
                else "(search off)"
            )
            tune = (
                "fine-tune longer or otherwise (your finetune loop; CLI: more --finetune-epochs, --finetune-lr)"
                if self.finetune is not None
                else "fine-tune (finetune=...; CLI: --finetune-epochs)"
            )
            raise PruningError(
                f"no pruned form at ratio {self.settings['ratio']} passes the gate {how}; last tried: {report}. "
                f"Prune less (a lower ratio), {tune}, exempt more layers or loosen the gate",
                result,
            )
        return candidate, result


def _why_stopped(layers: int, max_exempt: int | None) -> str:
    """Why the exemption search stopped (it stops early only when the gate passes): the bound it reached."""
    if max_exempt is None:
        return "the most the search allows (half the prunable layers; max_exempt_layers, CLI --max-exempt-layers)"
    if max_exempt >= layers:
        return "every prunable layer"
    return f"the most max_exempt_layers={max_exempt} (CLI --max-exempt-layers) allows"


def _widths(before: nn.Module, after: nn.Module) -> list[str]:
    """``name: in x out -> in x out`` for each conv/linear whose shape changed."""
    shapes = {name: tuple(m.weight.shape[:2]) for name, m in _layers(before).items()}
    lines = []
    for name, module in _layers(after).items():
        new = tuple(module.weight.shape[:2])
        if shapes.get(name) != new:
            old = shapes.get(name, ("?", "?"))
            lines.append(f"{name}: {old[1]}x{old[0]} -> {new[1]}x{new[0]} (in x out)")
    return lines
