"""The fold driver: trace a module, fold its graph, and fall back where tracing fails.

:func:`fold` traces the model (:mod:`~trainfer.reparam.fold.trace`; untraceable submodules stay
opaque leaves, folded inside on their own), then runs the graph pass :func:`_fold_graph`:

1. drop eval no-ops and split padding modes (:mod:`~trainfer.reparam.fold.passes`);
2. propagate shapes (:mod:`~trainfer.reparam.fold.shapes`), make rank checks constant and move
   batch norms next to the linear heads they reach;
3. find the linear regions (:mod:`~trainfer.reparam.fold.recognize`, through the handler table of
   :mod:`~trainfer.reparam.fold.handlers`) and split those that would cost more as one conv
   (:mod:`~trainfer.reparam.fold.cost`);
4. rewrite each region as one conv or linear (:mod:`~trainfer.reparam.fold.rewrite`), store the
   constants computed from parameters that remain as buffers
   (:func:`~trainfer.reparam.fold.constants.precompute`) and drop dead code.

When a module's own ``forward`` cannot be traced, it runs once on its recorded inputs (positional
and keyword, copied: a module that assigns into a list it was given must not change the record)
and each outermost submodule that ran is folded separately on its own recorded inputs, inside
containers that were iterated rather than called too; in an ``nn.Sequential`` that was called, a
layer directly followed by a BatchNorm is folded as the two-node graph ``layer -> bn`` (the same
recognition, through the same handler table, as every other graph). The log records each
fallback, each part that never ran, and each part whose folding raised (that part is left as it was).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainfer.capture import Call, capture_inputs, snapshot
from trainfer.reparam.fold.constants import precompute
from trainfer.reparam.fold.cost import settle_costs
from trainfer.reparam.fold.effects import eliminate_dead_code
from trainfer.reparam.fold.handlers import FoldHandlers
from trainfer.reparam.fold.log import FoldLog
from trainfer.reparam.fold.passes import (
    drop_eval_noops,
    fold_norms_into_channels_last_linears,
    move_batch_norms_into_heads,
    resolve_rank_checks,
    split_padding_modes,
)
from trainfer.reparam.fold.regions import FoldGraph
from trainfer.reparam.fold.rewrite import rewrite_region
from trainfer.reparam.fold.shapes import propagate_shapes
from trainfer.reparam.fold.trace import (
    Untraceable,
    preserve_attributes,
    trace,
    trace_arguments,
    trace_around_untraceable,
)

__all__ = ["fold"]


@dataclass(frozen=True)
class _Run:
    """One :func:`fold` call: the handler table it reads and the log it writes."""

    handlers: FoldHandlers
    log: FoldLog


def fold(
    model: nn.Module,
    example_inputs: Sequence[Any],
    example_kwargs: Mapping[str, Any] | None = None,
    handlers: FoldHandlers | None = None,
) -> tuple[nn.Module, FoldLog]:
    """Fold ``model`` (in eval mode; modified and reused) into its inference form.

    ``example_inputs`` (a tuple of positional arguments) and ``example_kwargs`` (keyword
    arguments) drive shape propagation. ``handlers``: the table that recognises linear calls
    (default: :meth:`FoldHandlers.default`, the built-ins and registered entries). Returns the
    folded module, normally an ``fx.GraphModule``, and the log of what happened. An exception
    while folding a part of the model (a submodule folded on its own) leaves that part as it was,
    with the reason in ``log.fallbacks``; one while folding the model's own graph is raised.
    """
    run = _Run(handlers or FoldHandlers.default(), FoldLog())
    return _fold_module(model, Call(tuple(example_inputs), dict(example_kwargs or {})), "", run), run.log


def _fold_part(module: nn.Module, call: Call, prefix: str, run: _Run) -> nn.Module:
    """:func:`_fold_module`, or ``module`` as it was if folding it raised (the log says why).

    Folding changes a module whose own forward stays Python code in place (its children are
    replaced), so a copy taken before is what a failure returns.
    """
    try:
        original = copy.deepcopy(module)
    except Exception:  # noqa: BLE001 - a module holding what cannot be copied is folded without a way back
        return _fold_module(module, call, prefix, run)
    try:
        return _fold_module(module, call, prefix, run)
    except Exception as error:  # noqa: BLE001 - user forward code can raise anything when re-run
        where = prefix.rstrip(".") or "model"
        run.log.fallbacks.append(f"{where}: folding it raised {_reason(error)}; left as it was")
        return original


def _fold_module(module: nn.Module, call: Call, prefix: str, run: _Run) -> nn.Module:
    """Fold ``module`` as one graph, its untraceable submodules kept as opaque leaves (their insides
    folded separately); if its own ``forward`` cannot be traced, fold its children separately."""
    try:
        inputs, concrete = trace_arguments(module, call.args, call.kwargs)
        gm, opaque = trace_around_untraceable(module, concrete, run.handlers.leaf_types)
    except Untraceable as untraceable:
        where = prefix.rstrip(".") or "model"
        reason = _reason(untraceable.error)
        run.log.fallbacks.append(f"{where}: not traceable ({reason}); folded its children separately")
        return _fold_children(module, call, prefix, run)
    _fold_opaque(gm, opaque, inputs, prefix, run)
    return _fold_graph(gm, inputs, prefix, run)


def _fold_opaque(
    gm: fx.GraphModule, opaque: dict[str, Exception], inputs: tuple[Any, ...], prefix: str, run: _Run
) -> None:
    """Record each opaque module under "not folded" with its reason, and fold its insides on their own."""
    if not opaque:
        return
    with capture_inputs(gm, list(opaque)) as recorded, torch.no_grad():
        gm(*snapshot(inputs))
    for name, error in opaque.items():
        run.log.kept.append(
            f"{prefix}{name}: not traceable by torch.fx ({_reason(error)}); kept as one opaque op, folded around"
        )
        if name in recorded:
            original = gm.get_submodule(name)
            folded = _fold_part(original, recorded[name], f"{prefix}{name}.", run)
            gm.set_submodule(name, _installed(original, folded, recorded[name]))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:160]


def _fold_children(module: nn.Module, call: Call, prefix: str, run: _Run) -> nn.Module:
    """Fold, in ``module`` whose own forward stays, each outermost submodule that ran on ``call``.

    A container iterated rather than called (``for m in self.model``) is looked into: its members
    that ran are folded each on its own. Adjacent Conv->BatchNorm members are fused only in an
    ``nn.Sequential`` called as a whole (a loop over one may route values between its members).
    What never ran is listed under "not folded".
    """
    names = [name for name, _ in module.named_modules() if name]
    with capture_inputs(module, names) as calls, torch.no_grad():
        module(*snapshot(call.args), **snapshot(call.kwargs))
    _fold_members(module, "", calls, prefix, run)
    return module


def _fold_members(parent: nn.Module, path: str, calls: dict[str, Call], prefix: str, run: _Run) -> None:
    """Fold the members of ``parent`` (at ``path`` inside the module being folded) that ran."""
    for name, child in list(parent.named_children()):
        qualified = f"{path}{name}"
        if qualified in calls:
            if not run.handlers.is_leaf(child):
                folded = _fold_part(child, calls[qualified], f"{prefix}{qualified}.", run)
                setattr(parent, name, _installed(child, folded, calls[qualified]))
        elif any(other.startswith(f"{qualified}.") for other in calls):
            _fold_members(child, f"{qualified}.", calls, prefix, run)
        else:
            run.log.kept.append(f"{prefix}{qualified}: never ran on the example inputs; left as it is")
    if isinstance(parent, nn.Sequential):
        if not path or path.rstrip(".") in calls:
            _fold_sequential_pairs(parent, path, calls, prefix, run)
        else:
            _explain_unfused_pairs(parent, f"{prefix}{path}", run.log)


def _fold_sequential_pairs(sequence: nn.Sequential, path: str, calls: dict[str, Call], prefix: str, run: _Run) -> None:
    """Fold each leaf member directly followed by a BatchNorm member, in ``sequence`` (at ``path``), as the
    graph ``layer -> bn`` run on the layer's recorded input; the layer's slot gets the result, the BN's
    an ``nn.Identity``. Recognition is the graph pass's: a pair the handler table does not read as
    linear, or that the algebra refuses, stays (the log says why)."""
    names = list(sequence._modules)
    for first, second in zip(names, names[1:]):
        layer, bn = sequence._modules[first], sequence._modules[second]
        leaves = run.handlers.is_leaf(layer) and run.handlers.is_leaf(bn)
        if not (leaves and isinstance(bn, _BatchNorm) and not isinstance(layer, _BatchNorm)):
            continue
        if f"{path}{first}" not in calls:
            continue  # never ran: no input to trace it on (listed as such)
        pair = copy.deepcopy(nn.Sequential(OrderedDict([(first, layer), (second, bn)])))  # the pass edits modules
        traced = trace(pair, leaf_types=run.handlers.leaf_types)
        regions = len(run.log.regions)
        folded = _fold_graph(traced, calls[f"{path}{first}"].args, f"{prefix}{path}", run)
        if len(run.log.regions) > regions:
            run.log.regions[-1].name = f"{prefix}{path}{first}"  # the region's module lives in the layer's slot
            sequence._modules[first], sequence._modules[second] = _only_module(folded), nn.Identity()


def _only_module(gm: fx.GraphModule) -> nn.Module:
    """The one module ``gm`` calls on its input and returns, if that is all it does; else ``gm``."""
    calls = [node for node in gm.graph.nodes if node.op not in ("placeholder", "output")]
    if len(calls) == 1 and calls[0].op == "call_module" and len(gm.graph.find_nodes(op="placeholder")) == 1:
        return gm.get_submodule(str(calls[0].target))
    return gm


def _explain_unfused_pairs(sequential: nn.Sequential, prefix: str, log: FoldLog) -> None:
    """List each BatchNorm of an iterated (not called) ``nn.Sequential`` that follows a member directly."""
    for index, member in enumerate(sequential):
        if index and isinstance(member, _BatchNorm):
            log.kept.append(
                f"{prefix}{index}: a BatchNorm member of an nn.Sequential its parent iterates instead of calling "
                "(the loop may route values between members); not fused with the member before it"
            )


def _installed(original: nn.Module, folded: nn.Module, call: Call) -> nn.Module:
    """What goes in ``original``'s slot of a parent whose own Python ``forward`` stays: ``folded`` (a
    traced copy of ``original``), as an ``nn.Sequential`` when its graph is a chain of module calls.

    The chain ``x -> m1 -> m2 -> ... -> mk -> output`` (each module called on the value before it
    alone, nothing else computed or returned) is ``nn.Sequential(m1, ..., mk)`` exactly: the same
    modules called on the same values in the same order. An ``fx.GraphModule`` call costs more
    Python (its ``__call__`` wrapper and generated ``forward``), paid once per folded part per
    forward, so a parent that calls many folded parts (a model whose root cannot be traced) runs
    measurably slower with GraphModules. Only a part its parent called with one positional
    argument is replaced (``nn.Sequential`` takes no keywords), and only when every module name is
    a plain attribute name, so the folded modules keep their paths (``model.0.fused``).

    Either way the result gets the plain attributes of ``original`` it lacks: a parent whose own
    ``forward`` stays may read them (timm's ``LocalWindowAttention`` reads ``self.attn.resolution``,
    Ultralytics' loop ``m.f``); a ``GraphModule`` only keeps what its graph reads, and a deep copy
    of one only what :func:`~trainfer.reparam.fold.trace.preserve_attributes` set.
    """
    if not isinstance(folded, fx.GraphModule) or folded is original:
        return folded
    chain = _module_chain(folded) if len(call.args) == 1 and not call.kwargs else None
    installed: nn.Module = folded if chain is None else nn.Sequential(OrderedDict(chain))
    plain = {
        name: value
        for name, value in vars(original).items()
        if not name.startswith("_") and name != "training" and not hasattr(installed, name)
    }
    if isinstance(installed, fx.GraphModule):
        preserve_attributes(installed, plain)
    else:
        vars(installed).update(plain)
    return installed


def _module_chain(gm: fx.GraphModule) -> list[tuple[str, nn.Module]] | None:
    """The (name, module) calls of ``gm`` if its graph is ``input -> m1 -> ... -> mk -> output`` with
    each module called on the previous value alone (no keywords) and used only by the next; else ``None``."""
    *body, output = gm.graph.nodes
    if not body or body[0].op != "placeholder" or len(body) < 2:
        return None
    previous, chain = body[0], []
    for node in body[1:]:
        single = node.op == "call_module" and node.args == (previous,) and not node.kwargs
        if not single or len(previous.users) != 1 or "." in str(node.target):
            return None
        chain.append((str(node.target), gm.get_submodule(str(node.target))))
        previous = node
    return chain if output.args == (previous,) and len(previous.users) == 1 else None


def _fold_graph(gm: fx.GraphModule, inputs: tuple[Any, ...], prefix: str, run: _Run) -> fx.GraphModule:
    """The graph pass (steps 1-4 above) on ``gm``, traced from the module at path ``prefix``."""
    log, handlers = run.log, run.handlers
    log.dropped += drop_eval_noops(gm, prefix)
    split_padding_modes(gm, handlers)
    propagate_shapes(gm, inputs)
    resolve_rank_checks(gm.graph)
    move_batch_norms_into_heads(gm, handlers)
    fold_norms_into_channels_last_linears(gm, prefix, log, handlers)
    graph = FoldGraph.of(gm, prefix, handlers)
    splits: list[str] = []
    regions = settle_costs(graph, splits)
    log.kept += [*regions.kept, *splits]
    replaced: dict[fx.Node, fx.Node] = {}
    for root, expr in regions.roots:  # in graph order, so an anchor is replaced before regions read it
        replaced[root] = rewrite_region(graph, root, expr, replaced.get(expr.anchor, expr.anchor), log)
    eliminate_dead_code(gm.graph)
    precompute(gm, graph.constants)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    return fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
