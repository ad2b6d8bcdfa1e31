"""The handler table: which function says what a recognised call computes, keyed by call target.

Like ``torch.ao.quantization``'s fuser method mappings, recognition is data: a table from call
target to handler, apart from the pass that walks the graph, and like ``get_fuser_method`` it takes
extra entries per call. :class:`FoldHandlers` is one immutable table: the built-ins
(:data:`~trainfer.reparam.fold.builtin.BUILTIN_HANDLERS`), then the entries registered for the
whole process, then a call's own (``trainfer.deploy(..., handlers={MyConv: my_handler})``);
nothing a call passes outlives it. :func:`register_fold_handler` is a convenience that feeds every
call's default table; :func:`fold_handlers` shows that default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import fx, nn

from trainfer.errors import InputTypeError
from trainfer.reparam.fold.builtin import BUILTIN_HANDLERS, Handler
from trainfer.reparam.fold.calls import target_name
from trainfer.reparam.fold.trace import is_leaf

__all__ = ["FoldHandlers", "fold_handlers", "register_fold_handler", "unregister_fold_handler"]

#: Entries registered for the whole process (:func:`register_fold_handler`): only a default's source.
_REGISTERED: dict[Any, Handler] = {}


def _checked(target: Any, handler: Any) -> tuple[Any, Handler]:
    if not (isinstance(target, str) or callable(target)):
        raise InputTypeError(f"a fold handler's target is a module type, a function or a method name, not {target!r}")
    if not callable(handler):
        raise InputTypeError(f"a fold handler must be callable, not {type(handler).__name__}")
    return target, handler


@dataclass(frozen=True)
class FoldHandlers:
    """One handler table, read-only: call target -> handler, and the module types it makes leaves.

    A module type with an entry is traced as one node (never traced into) when its ``forward`` is
    that type's, so its handler sees the call.
    """

    table: Mapping[Any, Handler]
    leaf_types: frozenset[type[nn.Module]]

    @classmethod
    def default(cls, extra: Mapping[Any, Handler] | None = None) -> FoldHandlers:
        """The built-ins, then the registered entries, then ``extra`` (each replacing what it repeats)."""
        table = {**BUILTIN_HANDLERS, **_REGISTERED}
        for target, handler in (extra or {}).items():
            table.update([_checked(target, handler)])
        custom = [t for t in {**_REGISTERED, **(extra or {})} if isinstance(t, type) and issubclass(t, nn.Module)]
        return cls(MappingProxyType(table), frozenset(custom))

    def is_leaf(self, module: nn.Module) -> bool:
        """``module`` is one node of the trace (:func:`~trainfer.reparam.fold.trace.is_leaf` with these types)."""
        return is_leaf(module, self.leaf_types)

    def handler_for(self, node: fx.Node, modules: Mapping[str, nn.Module]) -> Handler | None:
        """The handler of ``node``'s call target; for a module call, of the first class along its type's MRO
        that has one, and only if the module is a leaf (an opaque module's ``forward`` is its own)."""
        if node.op == "call_module":
            module = modules[target_name(node)]
            if not self.is_leaf(module):
                return None
            return next((self.table[cls] for cls in type(module).__mro__ if cls in self.table), None)
        if node.op in ("call_function", "call_method") and not isinstance(node.target, type):
            try:
                return self.table.get(node.target)
            except TypeError:  # an unhashable callable
                return None
        return None


def register_fold_handler(target: type[nn.Module] | Any, handler: Handler) -> None:
    """Add ``handler`` for ``target`` to the default table of every later call (a convenience: a
    call's own ``handlers=`` argument does the same for that call only, and is preferred).

    ``target`` is what a graph node calls: a module type (its instances, and instances of
    subclasses that keep its ``forward``, are traced as one node each, never traced into), a
    function (``torch.nn.functional.conv2d``, ``operator.add``) or a ``Tensor`` method name (``"add_"``).

    Contract: ``handler(context, node)`` is called for each such node whose output is a floating
    2-D or 4-D tensor, with ``context`` a :class:`~trainfer.reparam.fold.regions.FoldContext`
    (read-only). It returns the node's expression, built by one of:

    * ``context.linear(node, source, op)``: the node computes ``op(source)`` for a
      :class:`~trainfer.reparam.algebra.ConvOp` ``op`` (``context.module(node)`` gives the module,
      ``context.constant(value)`` a parameter or constant argument as a tensor, or None);
    * ``context.chain(node, source, step)``: ``step(previous, anchor)`` maps the source's operator
      (None: the identity on ``anchor``) to the node's, raising ``AlgebraError`` where not exact;
    * ``context.add_branches(node, left, right, sign)``: ``left + sign * right``.

    Where the node is not linear, the handler raises
    :class:`~trainfer.reparam.fold.linearity.NotLinear` (``NotLinear("why")``: the reason is logged
    under "not folded"; ``NotLinear()``: nothing to report); that is the only way to decline.
    ``op`` must compute exactly what the node computes: the folded model is verified against the
    original by :func:`trainfer.deploy`, not by the folder.
    """
    target, handler = _checked(target, handler)
    _REGISTERED[target] = handler


def unregister_fold_handler(target: Any) -> None:
    """Undo :func:`register_fold_handler` for ``target`` (a built-in target gets its built-in handler back)."""
    _REGISTERED.pop(target, None)


def fold_handlers() -> dict[Any, Handler]:
    """A copy of the default table: call target -> handler (built-ins and registered entries)."""
    return dict(FoldHandlers.default().table)
