"""The handler table: which function says what a recognised call computes, keyed by call target.

Like ``torch.ao.quantization``'s fuser method mappings, recognition is data: a table from call
target to handler, apart from the pass that walks the graph. It starts as
:data:`~trainfer.reparam.fold.builtin.BUILTIN_HANDLERS` and users extend it with
:func:`register_fold_handler`.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from trainfer.errors import InputTypeError
from trainfer.reparam.fold.builtin import BUILTIN_HANDLERS, Handler
from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.trace import extra_leaf_types, is_leaf

__all__ = ["fold_handlers", "handler_for", "register_fold_handler", "unregister_fold_handler"]

_HANDLERS: dict[Any, Handler] = dict(BUILTIN_HANDLERS)


def register_fold_handler(target: type[nn.Module] | Any, handler: Handler) -> None:
    """Make the folder read calls of ``target`` with ``handler`` (replacing any handler it had).

    ``target`` is what a graph node calls: a module type (its instances, and instances of
    subclasses that keep its ``forward``, are traced as one node each, never traced into), a
    function (``torch.nn.functional.conv2d``, ``operator.add``) or a ``Tensor`` method name (``"add_"``).

    Contract: ``handler(context, node)`` is called for each such node whose output is a floating
    2-D or 4-D tensor, with ``context`` a :class:`~trainfer.reparam.fold.regions.FoldContext`. It
    returns None when the node is not linear, else the node's expression, built by one of:

    * ``context.linear(node, source, op)``: the node computes ``op(source)`` for a
      :class:`~trainfer.reparam.algebra.ConvOp` ``op`` (``context.module(node)`` gives the module,
      ``context.constant(value)`` a parameter or constant argument as a tensor, or None);
    * ``context.chain(node, source, step)``: ``step(previous, anchor)`` maps the source's operator
      (None: the identity on ``anchor``) to the node's, raising ``AlgebraError`` where not exact;
    * ``context.add_branches(node, left, right, sign)``: ``left + sign * right``.

    ``op`` must compute exactly what the node computes: the folded model is verified against the
    original by :func:`trainfer.deploy`, not by the folder. ``context.keep(node, reason)`` records why
    a node stays as it is.
    """
    if not (isinstance(target, str) or callable(target)):
        raise InputTypeError(f"a fold handler's target is a module type, a function or a method name, not {target!r}")
    if not callable(handler):
        raise InputTypeError(f"a fold handler must be callable, not {type(handler).__name__}")
    if isinstance(target, type) and issubclass(target, nn.Module):
        extra_leaf_types.add(target)
    _HANDLERS[target] = handler


def unregister_fold_handler(target: Any) -> None:
    """Undo :func:`register_fold_handler` for ``target`` (a built-in target gets its built-in handler back)."""
    extra_leaf_types.discard(target)
    if target in BUILTIN_HANDLERS:
        _HANDLERS[target] = BUILTIN_HANDLERS[target]
    else:
        _HANDLERS.pop(target, None)


def fold_handlers() -> dict[Any, Handler]:
    """A copy of the table now in use: call target -> handler."""
    return dict(_HANDLERS)


def handler_for(node: fx.Node, modules: dict[str, nn.Module]) -> Handler | None:
    """The handler of ``node``'s call target; for a module call, of the first class along its type's MRO
    that has one, and only if the module is a leaf (an opaque module's ``forward`` is its own)."""
    if node.op == "call_module":
        module = modules[target_name(node)]
        if not is_leaf(module):
            return None
        return next((_HANDLERS[cls] for cls in type(module).__mro__ if cls in _HANDLERS), None)
    if node.op in ("call_function", "call_method") and not isinstance(node.target, type):
        try:
            return _HANDLERS.get(node.target)
        except TypeError:  # an unhashable callable
            return None
    return None
