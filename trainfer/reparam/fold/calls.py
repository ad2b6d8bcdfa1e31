"""Arguments of the functional calls the folder reads, by name, with torch's defaults filled in.

``bind(node, "conv")`` gives ``{"input": ..., "weight": ..., "stride": 1, ...}`` for an
``F.conv2d`` node however it was called (positionally or by keyword). :func:`target_name` reads
the name a ``call_module``, ``call_method`` or ``get_attr`` node targets.
"""

from __future__ import annotations

from typing import Any, cast

from torch import fx

__all__ = ["bind", "target_name"]

_SIGNATURES: dict[str, tuple[tuple[str, Any], ...]] = {
    "conv": (
        ("input", None),
        ("weight", None),
        ("bias", None),
        ("stride", 1),
        ("padding", 0),
        ("dilation", 1),
        ("groups", 1),
    ),
    "linear": (("input", None), ("weight", None), ("bias", None)),
    "batch_norm": (
        ("input", None),
        ("running_mean", None),
        ("running_var", None),
        ("weight", None),
        ("bias", None),
        ("training", False),
        ("momentum", 0.1),
        ("eps", 1e-5),
    ),
    "pad": (("input", None), ("pad", None), ("mode", "constant"), ("value", None)),
    "avg_pool": (
        ("input", None),
        ("kernel_size", None),
        ("stride", None),
        ("padding", 0),
        ("ceil_mode", False),
        ("count_include_pad", True),
        ("divisor_override", None),
    ),
    "dropout": (("input", None), ("p", 0.5), ("training", True), ("inplace", False)),
}


def bind(node: fx.Node, signature: str) -> dict[str, Any]:
    """The call's arguments by name (``signature``: a key of the table above), defaults filled in."""
    names = [name for name, _ in _SIGNATURES[signature]]
    bound = dict(_SIGNATURES[signature])
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def target_name(node: fx.Node) -> str:
    """The target of a ``call_module``, ``call_method`` or ``get_attr`` node: a qualified or method name."""
    return cast(str, node.target)  # torch.fx's Node requires a str target for every op but call_function
