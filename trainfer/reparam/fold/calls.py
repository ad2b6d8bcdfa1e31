"""Arguments of the functional calls the folder reads, by name, with torch's own defaults filled in.

``bind(node)`` gives ``{"input": ..., "weight": ..., "stride": [1, 1], ...}`` for an ``F.conv2d``
node however it was called (positionally or by keyword). The names and defaults are read from the
call target's own signature (:func:`inspect.signature` for Python functions such as ``F.pad``;
``torch.fx.operator_schemas.get_signature_for_torch_op``, torch's schema, for builtins such as
``torch.conv2d``), never copied by hand, so a new torch cannot drift from them. A builtin with
overloads (``padding: List[int] = [0, 0]`` or ``str = 'valid'``) is read by its first schema; its
overloads name the arguments alike and their defaults mean the same (``tests/test_fold_calls.py``
passes the bound defaults explicitly and checks that every target computes what it did without
them). :func:`target_name` reads the name a ``call_module``, ``call_method`` or ``get_attr`` node targets.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any, cast

from torch import fx
from torch.fx.operator_schemas import get_signature_for_torch_op

from trainfer.errors import InputTypeError

__all__ = ["bind", "parameters", "target_name"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@cache  # a pure function of the target: signatures do not change while the process runs
def parameters(target: Any) -> tuple[tuple[str, Any], ...]:
    """``((name, default), ...)`` of ``target``'s positional parameters (``None`` where none is given)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin: torch's schema
        schemas = get_signature_for_torch_op(target)
        if not schemas:
            raise InputTypeError(
                f"no signature known for {target!r}: bind needs a call with a Python or torch signature"
            ) from None
        signature = schemas[0]
    return tuple(
        (p.name, None if p.default is inspect.Parameter.empty else p.default)
        for p in signature.parameters.values()
        if p.kind in _POSITIONAL
    )


def bind(node: fx.Node) -> dict[str, Any]:
    """The ``call_function`` node's arguments by name, with its target's defaults filled in."""
    table = parameters(node.target)
    bound = dict(table)
    bound.update(zip((name for name, _ in table), node.args))
    bound.update(node.kwargs)
    return bound


def target_name(node: fx.Node) -> str:
    """The target of a ``call_module``, ``call_method`` or ``get_attr`` node: a qualified or method name."""
    return cast(str, node.target)  # torch.fx's Node requires a str target for every op but call_function
