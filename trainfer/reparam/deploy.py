"""From a training-form model to its exact, cheapest inference form, proven equal.

``deploy`` = copy -> eval -> module protocols -> fold (``trainfer.fold``) -> verify -> report:

1. work on a deep copy in eval mode (the caller's parameters, buffers, modes and hooks stay as
   they were); hooks are instrumentation, not part of the inference form, and are not carried;
2. convert the copy to float64 and call the protocols blocks carry (``reparameterize()``,
   ``switch_to_deploy()``, ``fuse()``; :mod:`trainfer.protocols`), each checked on its own module:
   a conversion that is not float64-exact (float32 constants, weights copied into a new float32
   layer) is undone and that module is left to the folder;
3. fold every maximal linear region into one conv/linear (each folded kernel is rounded once,
   when the result is cast back to the model's dtype); drop what inference never runs;
4. verify, on the example inputs and random inputs of the same shapes: the float64 fold against
   the original in float64 (tolerance 1e-9), and the returned form against the original in the
   model's dtype (1e-5 for float32). A mismatch raises :class:`trainfer.EquivalenceError` naming
   where the forms part; a wrong model is never returned.

The report (:class:`DeployReport`, also ``deployed.trainfer_report`` and :func:`deploy_report`) lists
each region folded, what was kept and why, what was removed, counts before/after and the errors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from trainfer.capture import capture
from trainfer.errors import EquivalenceError, InputError, InputTypeError
from trainfer.numerics import TOLERANCE
from trainfer.opcount import BATCH_NORM_OPS, AtenOpCounter
from trainfer.recipe import attach_recipe, recipe_of
from trainfer.reparam.dead import DeadChannelReport, remove_dead_channels
from trainfer.reparam.fold import FoldedRegion, FoldHandlers, FoldLog, Handler, fold
from trainfer.reparam.protocols import ProtocolLog, apply_protocols
from trainfer.reparam.verify import (
    Equivalence,
    as_arguments,
    as_keywords,
    cast_plain_tensors,
    map_tensors,
    model_dtype,
    verify,
)
from trainfer.validate import check_tolerance

__all__ = ["DeployReport", "deploy", "deploy_report"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


@dataclass
class Counts:
    """Size and work of one form: parameter and buffer elements, leaf modules, aten ops one forward executes.

    ``parameters`` counts the elements of ``model.parameters()`` only; ``buffers`` those of
    ``model.buffers()`` (BatchNorm running statistics and the like), which are state, not weights.
    """

    parameters: int
    buffers: int
    modules: int
    convolutions: int
    batch_norms: int
    ops: int

    @classmethod
    def of(cls, model: nn.Module, arguments: tuple[Any, ...], keywords: dict[str, Any] | None = None) -> Counts:
        with torch.no_grad(), AtenOpCounter() as counter:
            model(*arguments, **(keywords or {}))
        executed = counter.counts
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            buffers=sum(b.numel() for b in model.buffers()),
            modules=sum(1 for m in model.modules() if not list(m.children())),
            convolutions=executed.get("convolution", 0),
            batch_norms=sum(n for name, n in executed.items() if name in BATCH_NORM_OPS),
            ops=sum(executed.values()),
        )


@dataclass
class DeployReport:
    """What :func:`deploy` did to a model, printable."""

    model: str
    #: The keyword options deploy ran with; a deploy-form bundle replays them to rebuild the architecture.
    options: dict[str, Any] = field(default_factory=dict)
    #: Protocol calls kept (``"name.method()"``) and those undone with the reason (the folder did those).
    protocols: list[str] = field(default_factory=list)
    protocols_rejected: list[str] = field(default_factory=list)
    regions: list[FoldedRegion] = field(default_factory=list)
    #: Why each op or module that could have folded did not (and parts of the model that never ran).
    kept: list[str] = field(default_factory=list)
    #: Modules that are gone and do no work: identities in eval mode, code inference never runs.
    removed: list[str] = field(default_factory=list)
    #: Modules whose forward was traced through: gone as modules, their operations in the graph.
    inlined: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    hooks_not_carried: int = 0
    before: Counts | None = None
    after: Counts | None = None
    verification: dict[str, Equivalence] = field(default_factory=dict)
    #: With ``prune_dead=True``: the channels removed per layer, MACs and parameters before/after.
    dead_channels: DeadChannelReport | None = None
    #: Modules of a type a custom fold handler reads (``handlers=`` or ``register_fold_handler``).
    handled: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """All verifications passed (``True`` when verification was skipped)."""
        return all(eq.ok for eq in self.verification.values())

    def failure(self) -> str:
        """One paragraph naming the failed checks and where the forms first part."""
        lines = []
        for label, eq in self.verification.items():
            if eq.ok:
                continue
            worst = max(eq.outputs, key=lambda o: (not o.ok, o.max_rel_error))
            line = f"{label}: {worst}"
            if eq.divergence:
                line += f"; first divergence at module {eq.divergence!r}" + self._cause_at(eq.divergence)
            lines.append(line)
        return "deploy changed what the model computes: " + "; ".join(lines)

    def _cause_at(self, module: str) -> str:
        """What deploy did at ``module``: its own inexact conversion, or the folded region it belongs to."""
        own = [call for call in self.protocols if call.startswith(f"{module}.") and ": " in call]
        if own:
            return f" ({own[0]})"
        region = next((r for r in self.regions if module in r.members), None)
        if region is not None:
            return f" (folded into {region.name}{self._members_note(region.members, module)})"
        feeding = [r.name for r in self.regions if module in r.feeds]
        return f" (its input comes from the folded region {', '.join(feeding)})" if feeding else ""

    def _members_note(self, members: list[str], module: str) -> str:
        """The other members of ``module``'s region, where the error may start (only the region's output
        is compared), and those a custom fold handler read: the first suspects."""
        others = [name for name in members if name != module]
        note = f" with {', '.join(others)}, where the error may start" if others else ""
        handled = [name for name in members if name in self.handled]
        if handled:
            note += f"; {', '.join(handled)} folded by a custom fold handler: check the expression it returns"
        return note

    def __str__(self) -> str:
        lines = [f"deploy report for {self.model}"]
        if self.before and self.after:
            for name in ("parameters", "buffers", "modules", "convolutions", "batch_norms", "ops"):
                lines.append(f"  {name:<13} {getattr(self.before, name):>10} -> {getattr(self.after, name):>10}")
        sections = [
            ("protocols called", self.protocols),
            ("protocols undone (not exact, or they failed)", self.protocols_rejected),
            ("regions folded", [str(r) for r in self.regions]),
            ("removed (no work in inference)", self.removed),
            ("inlined (traced through: their operations run in the graph)", self.inlined),
            ("not folded", self.kept),
            ("fallbacks (untraceable code)", self.fallbacks),
        ]
        for title, items in sections:
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {item}" for item in items]
        if self.dead_channels is not None:
            lines.append(str(self.dead_channels))
        if self.hooks_not_carried:
            lines.append(f"hooks not carried to the deployed form: {self.hooks_not_carried}")
        for label, eq in self.verification.items():
            lines.append(f"verification ({label}): " + str(eq).replace("\n", "\n  "))
        return "\n".join(lines)


def deploy(
    model: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    protocols: bool | str = True,
    verify_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    allow_empty: bool = False,
    prune_dead: bool = False,
    handlers: Mapping[Any, Handler] | None = None,
) -> nn.Module:
    """The inference form of ``model``: one conv per linear region, nothing that does not run.

    ``example_inputs``: a tensor or a tuple of positional arguments; an argument may be a list,
    tuple or dict of tensors (``model([img1, img2])``: ``example_inputs=([img1, img2],)``).
    ``example_kwargs``: keyword arguments of the example call (``{"attention_mask": mask}``).
    ``allow_empty=True`` accepts outputs that are empty on every input verified (by default
    such an output fails verification: nothing was compared; see docs/deploy.md). ``inplace=True`` lets deploy
    modify ``model`` (eval mode, protocols) instead of copying it. ``protocols``: ``True`` calls the
    blocks' own ``reparameterize()``/``switch_to_deploy()``/``fuse()`` and keeps each conversion
    that is float64-exact on its module; ``"trust"`` keeps every conversion as its author wrote
    it (an inexact one then fails verification, which names it); ``False`` relies on the folder alone.
    ``rtol``/``atol`` override the per-dtype tolerance of the model-dtype check.
    ``verify_inputs`` (a tensor or tuple, like ``example_inputs``): verify on these and random
    inputs of their shapes instead of the example's, e.g. a smaller image for a fully
    convolutional model (the folded weights do not depend on the input size; what a smaller input
    proves is in docs/deploy-protocols.md). The fold itself always traces ``example_inputs``.
    ``prune_dead=True`` also removes the folded graph's provably dead channels (constant or unused;
    :mod:`trainfer.reparam.dead`, docs/pruning.md), folding their constants into the next biases;
    the float64 check covers it and ``report.dead_channels`` lists what went.
    ``handlers``: extra fold handlers for this call only, ``{call target: handler}`` over the
    built-in table (and any :func:`~trainfer.reparam.fold.register_fold_handler` entries); the
    contract is :func:`~trainfer.reparam.fold.register_fold_handler`'s (docs/deploy.md).
    Raises :class:`trainfer.EquivalenceError` (with the report) if verification fails.
    """
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol, zero=True)
    options = _Options(inplace, verify, rtol, atol, protocols, allow_empty, prune_dead, FoldHandlers.default(handlers))
    deployed, report = _deploy(model, example_inputs, example_kwargs, verify_inputs, options)
    if not report.ok:
        raise EquivalenceError(report.failure(), report)
    return deployed


def deploy_report(
    model: nn.Module,
    example_inputs: Any,
    *,
    protocols: bool | str = True,
    prune_dead: bool = False,
    handlers: Mapping[Any, Handler] | None = None,
) -> DeployReport:
    """The :class:`DeployReport` of deploying ``model``, verification errors included (never raises them)."""
    options = _Options(protocols=protocols, prune_dead=prune_dead, handlers=FoldHandlers.default(handlers))
    return _deploy(model, example_inputs, None, None, options)[1]


@dataclass
class _Options:
    inplace: bool = False
    check: bool = True
    rtol: float | None = None
    atol: float | None = None
    protocols: bool | str = True
    allow_empty: bool = False
    prune_dead: bool = False
    handlers: FoldHandlers = field(default_factory=FoldHandlers.default)


def _deploy(
    model: nn.Module, example_inputs: Any, example_kwargs: Any, verify_inputs: Any, options: _Options
) -> tuple[nn.Module, DeployReport]:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"deploy expects an nn.Module; got {type(model).__name__}")
    protocols = options.protocols
    if protocols not in (True, False, "trust"):
        raise InputError(f"protocols must be True, False or 'trust'; got {protocols!r}")
    if not isinstance(options.prune_dead, bool):
        raise InputTypeError(f"prune_dead must be True or False; got {options.prune_dead!r}")
    dtype = model_dtype(model)
    keywords = _cast(as_keywords(example_kwargs), dtype)
    arguments = _cast(as_arguments(example_inputs, keywords), dtype)
    checked = arguments if verify_inputs is None else _cast(as_arguments(verify_inputs, keywords), dtype)
    recorded: dict[str, Any] = {"protocols": protocols, **({"prune_dead": True} if options.prune_dead else {})}
    report = DeployReport(type(model).__name__, options=recorded)
    working = model.eval() if options.inplace else _inference_copy(model)
    report.hooks_not_carried = _strip_hooks(working)
    reference = copy.deepcopy(working) if options.check else None
    state = _plain_state(working)
    report.before, ran = _counts_of_original(working, arguments, keywords)
    _restore_plain_state(state)  # what forward cached in float32 must not reach the float64 fold
    working = _in_float64(working)
    arguments64, keywords64 = _cast(arguments, torch.float64), _cast(keywords, torch.float64)
    calls = ProtocolLog()
    if protocols:
        working, calls = apply_protocols(
            working, arguments64, undo_inexact=protocols is True, example_kwargs=keywords64
        )
        report.protocols = [str(call) for call in calls.kept]
        report.protocols_rejected = [str(call) for call in calls.rejected]
    converted = calls.converted
    leaves = _leaf_names(working)  # after the protocols: what they replaced is not "removed"
    custom = tuple(options.handlers.leaf_types)
    report.handled = [name for name, module in working.named_modules() if custom and isinstance(module, custom)]
    folded, log = fold(working, arguments64, keywords64, options.handlers)
    folded.eval()  # parts the fold built (GraphModule, nn.Sequential) start in training mode
    _record(report, log)
    if options.prune_dead and isinstance(folded, fx.GraphModule):
        report.dead_channels = remove_dead_channels(folded, arguments64)
    elif options.prune_dead:
        report.kept.append("dead channels: not searched (the model did not trace as one graph)")
    pairs = {region.name: region.members[-1] for region in report.regions}
    check = {"example_kwargs": keywords, "allow_empty": options.allow_empty, "pairs": pairs, "opaque": converted}
    if reference is not None and dtype != torch.float64:
        # The fold ran on exactly up-cast weights, so float64's own tolerance applies.
        report.verification["float64"] = verify(
            reference, folded, checked, rtol=TOLERANCE[torch.float64], dtypes=(torch.float64,), **check
        )
    deployed = cast_plain_tensors(folded.to(dtype), dtype)
    report.after = Counts.of(deployed, arguments, keywords)
    _record_vanished(report, leaves, deployed, ran)
    if reference is not None:
        report.verification[str(dtype).removeprefix("torch.")] = verify(
            reference,
            deployed,
            checked,
            rtol=options.rtol,
            atol=options.atol,
            dtypes=(dtype,),
            near_ties=dtype != torch.float64,  # float64 is the strict proof; see trainfer.reparam.ties
            **check,
        )
    _blame_inexact_protocols(report, calls)
    recipe = recipe_of(model)
    if recipe is not None:
        attach_recipe(deployed, replace(recipe, form="deploy", deploy_options=report.options))
    deployed.trainfer_report = report  # type: ignore[assignment]  # nn.Module takes any attribute; torch types them Tensor | Module
    return deployed, report


def _blame_inexact_protocols(report: DeployReport, calls: ProtocolLog) -> None:
    """A failed float64 check's divergence is the first kept conversion measured inexact on its own module."""
    inexact = [call.module or "model" for call in calls.kept if call.exact is False]
    for label, eq in report.verification.items():
        if inexact and label == "float64" and not eq.ok:
            eq.divergence = inexact[0]


def _counts_of_original(
    model: nn.Module, arguments: tuple[Any, ...], keywords: dict[str, Any]
) -> tuple[Counts, set[str]]:
    """The original's counts and the names of the modules that ran; this first forward also checks
    that the example inputs fit the model."""
    try:
        with capture(model, lambda name, module, output: None) as ran:
            counts = Counts.of(model, arguments, keywords)
        return counts, {name.split("#")[0] for name in ran}
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        given = ", ".join(
            f"tensor{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor) else repr(a)
            for a in arguments
        )
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{type(model).__name__} cannot run on the example inputs ({given}): {reason}") from error


def _plain_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module with a copy of its plain attributes (what ``forward`` may cache: ``self.anchors``)."""
    return [(module, {k: v for k, v in vars(module).items() if _is_plain(k)}) for module in model.modules()]


def _restore_plain_state(state: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Put back the plain attributes of :func:`_plain_state`, removing those set since."""
    for module, attributes in state:
        for name in [k for k in vars(module) if _is_plain(k) and k not in attributes]:
            del vars(module)[name]
        vars(module).update(attributes)


def _is_plain(name: str) -> bool:
    return not name.startswith("_") and name != "training"


def _in_float64(model: nn.Module) -> nn.Module:
    """``model`` converted to float64 in place (folding there rounds each kernel once, at the end)."""
    try:
        return cast_plain_tensors(model.double(), torch.float64)
    except (RuntimeError, TypeError) as error:
        raise InputError(f"deploy folds and verifies in float64, and {type(model).__name__} cannot: {error}") from error


def _inference_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def _strip_hooks(model: nn.Module) -> int:
    """Remove every module hook from ``model`` (a copy); return how many there were."""
    removed = 0
    for module in model.modules():
        removed += sum(len(getattr(module, name, {})) for name in _HOOKS)
        for name in _HOOKS + _HOOK_FLAGS:
            getattr(module, name, {}).clear()
    return removed


def _cast(arguments: Any, dtype: torch.dtype) -> Any:
    """``arguments`` (nested containers too) with their floating-point tensors in ``dtype``."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, arguments)


def _record(report: DeployReport, log: FoldLog) -> None:
    report.regions, report.kept, report.fallbacks = log.regions, log.kept, log.fallbacks
    report.removed = [f"{item}: identity in eval mode" for item in log.dropped]


def _leaf_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and not list(module.children())]


def _record_vanished(report: DeployReport, leaves: list[str], deployed: nn.Module, ran: set[str]) -> None:
    """Sort the leaf modules of the original that neither survive nor were folded: traced through
    (they ran on the example inputs: inlined) or never run (training-only code, unused heads: removed)."""
    survivors = {name for name, _ in deployed.named_modules()}
    folded = {member for region in report.regions for member in region.members}
    dropped = {item.split(" ")[0] for item in report.removed}
    for name in leaves:
        if name in survivors | folded | dropped:
            continue
        if name in ran:
            report.inlined.append(f"{name}: traced through; its operations run in the graph")
        else:
            report.removed.append(f"{name}: never runs in inference")
