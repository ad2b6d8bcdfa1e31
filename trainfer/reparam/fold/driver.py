"""The fold driver: trace a module, fold its graph, and fall back where tracing fails.

:func:`fold` traces the model (:mod:`~trainfer.reparam.fold.trace`; untraceable submodules stay
opaque leaves, folded inside on their own), then runs the graph pass :func:`_fold_graph`:

1. drop eval no-ops and split padding modes (:mod:`~trainfer.reparam.fold.passes`);
2. propagate shapes (:mod:`~trainfer.reparam.fold.shapes`), make rank checks constant and move
   batch norms next to the linear heads they reach;
3. find the linear regions (:mod:`~trainfer.reparam.fold.recognize`, through the handler table of
   :mod:`~trainfer.reparam.fold.handlers`) and split those that would cost more as one conv
   (:mod:`~trainfer.reparam.fold.cost`);
4. rewrite each region as one conv or linear (:mod:`~trainfer.reparam.fold.rewrite`) and drop dead code.

When a module's own ``forward`` cannot be traced, its children are folded separately and
Conv->BatchNorm pairs adjacent in an ``nn.Sequential`` are fused; the log records the fallback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from trainfer.reparam.fold.cost import settle_costs
from trainfer.reparam.fold.log import FoldLog
from trainfer.reparam.fold.passes import (
    drop_eval_noops,
    move_batch_norms_into_heads,
    resolve_rank_checks,
    split_padding_modes,
)
from trainfer.reparam.fold.regions import FoldContext
from trainfer.reparam.fold.rewrite import fuse_sequential_pairs, rewrite_region
from trainfer.reparam.fold.shapes import propagate_shapes
from trainfer.reparam.fold.trace import Untraceable, is_leaf, trace_around_untraceable

__all__ = ["fold"]


def fold(model: nn.Module, example_inputs: Sequence[Any]) -> tuple[nn.Module, FoldLog]:
    """Fold ``model`` (in eval mode; modified and reused) into its inference form.

    ``example_inputs`` (a tuple of positional arguments) drive shape propagation. Returns the
    folded module, normally an ``fx.GraphModule``, and the log of what happened.
    """
    log = FoldLog()
    return _fold_module(model, tuple(example_inputs), "", log), log


def _fold_module(module: nn.Module, inputs: tuple[Any, ...], prefix: str, log: FoldLog) -> nn.Module:
    """Fold ``module`` as one graph, its untraceable submodules kept as opaque leaves (their insides
    folded separately); if its own ``forward`` cannot be traced, fold its children separately."""
    try:
        gm, opaque = trace_around_untraceable(module, _unsupplied_defaults(module, inputs))
    except Untraceable as untraceable:
        where = prefix.rstrip(".") or "model"
        log.fallbacks.append(f"{where}: not traceable ({_reason(untraceable.error)}); folded its children separately")
        return _fold_children(module, inputs, prefix, log)
    _fold_opaque(gm, opaque, inputs, prefix, log)
    return _fold_graph(gm, inputs, prefix, log)


def _fold_opaque(
    gm: fx.GraphModule, opaque: dict[str, Exception], inputs: tuple[Any, ...], prefix: str, log: FoldLog
) -> None:
    """Record each opaque module under "not folded" with its reason, and fold its insides on their own."""
    if not opaque:
        return
    with _recorded_inputs(gm, list(opaque)) as recorded, torch.no_grad():
        gm(*inputs)
    for name, error in opaque.items():
        log.kept.append(
            f"{prefix}{name}: not traceable by torch.fx ({_reason(error)}); kept as one opaque op, folded around"
        )
        if name in recorded:
            original = gm.get_submodule(name)
            folded = _fold_module(original, recorded[name], f"{prefix}{name}.", log)
            gm.set_submodule(name, _keep_plain_attributes(original, folded))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _unsupplied_defaults(module: nn.Module, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The defaults of ``module.forward``'s arguments that ``inputs`` leave out (folded as constants).

    Tracing them as inputs would turn ``shift=None`` into a tensor placeholder (``shift is None``
    false), so defaults are used as the example call uses them.
    """
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    supplied = len(inputs)
    defaults = {}
    for index, parameter in enumerate(parameters):
        if parameter.default is inspect.Parameter.empty or (parameter.kind in positional and index < supplied):
            continue
        defaults[parameter.name] = parameter.default
    return defaults


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


@contextmanager
def _recorded_inputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[Any, ...]]]:
    """Record the positional inputs of each named submodule's first call (pre-hooks, always removed)."""
    inputs: dict[str, tuple[Any, ...]] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(child: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args)

        return hook

    try:
        for name in names:
            handles.append(module.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def _fold_children(module: nn.Module, inputs: tuple[Any, ...], prefix: str, log: FoldLog) -> nn.Module:
    with _recorded_inputs(module, [name for name, _ in module.named_children()]) as child_inputs, torch.no_grad():
        module(*inputs)
    for name, child in list(module.named_children()):
        if name in child_inputs and not is_leaf(child):
            folded = _fold_module(child, child_inputs[name], f"{prefix}{name}.", log)
            setattr(module, name, _keep_plain_attributes(child, folded))
    if isinstance(module, nn.Sequential):
        fuse_sequential_pairs(module, prefix, log)
    return module


def _keep_plain_attributes(original: nn.Module, folded: nn.Module) -> nn.Module:
    """``folded`` (a traced copy of ``original``) given the plain attributes of ``original`` it lacks.

    A parent whose own Python ``forward`` stays may read them (timm's ``LocalWindowAttention`` reads
    ``self.attn.resolution``); a ``GraphModule`` only keeps what its graph reads. They are also listed
    under ``meta["_user_preserved_attributes"]``, which ``GraphModule.__deepcopy__`` restores.
    """
    if not isinstance(folded, fx.GraphModule) or folded is original:
        return folded
    plain = {
        name: value
        for name, value in vars(original).items()
        if not name.startswith("_") and name != "training" and not hasattr(folded, name)
    }
    for name, value in plain.items():
        setattr(folded, name, value)
    folded.meta.setdefault("_user_preserved_attributes", {}).update(plain)
    return folded


def _fold_graph(gm: fx.GraphModule, inputs: tuple[Any, ...], prefix: str, log: FoldLog) -> fx.GraphModule:
    """The graph pass (steps 1-4 above) on ``gm``, traced from the module at path ``prefix``."""
    log.dropped += drop_eval_noops(gm, prefix)
    split_padding_modes(gm)
    propagate_shapes(gm, inputs)
    resolve_rank_checks(gm.graph)
    move_batch_norms_into_heads(gm)
    context = FoldContext(gm, prefix)
    splits: list[str] = []
    roots = settle_costs(context, splits)
    log.kept += context.kept + splits
    replaced: dict[fx.Node, fx.Node] = {}
    for root, expr in roots:  # in graph order, so an anchor is replaced before regions read it
        replaced[root] = rewrite_region(context, root, expr, replaced.get(expr.anchor, expr.anchor), log)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    return fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
