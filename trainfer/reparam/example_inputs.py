"""A model's example inputs as a call: positional arguments and keywords holding tensors, possibly
inside (nested) lists, tuples and dicts, and a map over every tensor in them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from trainfer.errors import InputTypeError


def as_arguments(example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None) -> tuple[Any, ...]:
    """A tensor or a tuple/list of positional arguments -> a tuple of positional arguments.

    An argument may itself be a list, tuple or dict of tensors (``model([image1, image2])`` is
    given as ``([image1, image2],)``). Some tensor must be among the arguments or ``example_kwargs``.
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and (_holds_tensor(example_inputs) or _holds_tensor(example_kwargs)):
        return tuple(example_inputs)
    raise InputTypeError(
        "example_inputs must be a tensor or a tuple of positional arguments holding at least one tensor "
        f"(a list of tensors given as one argument: ([t1, t2],)); got {type(example_inputs).__name__}"
    )


def as_keywords(example_kwargs: Any) -> dict[str, Any]:
    """``example_kwargs`` (``None`` or a mapping of argument names to values) as a dict."""
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise InputTypeError(f"example_kwargs must be a dict of argument names to values; got {example_kwargs!r:.80}")
    return dict(example_kwargs)


def map_tensors(function: Callable[[Tensor], Any], value: Any) -> Any:
    """``value`` with ``function`` applied to every tensor in it, inside (nested) lists, tuples and dicts."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, list):
        return [map_tensors(function, v) for v in value]
    if isinstance(value, tuple):
        items = [map_tensors(function, v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, Mapping):
        return {k: map_tensors(function, v) for k, v in value.items()}
    return value


def _holds_tensor(value: Any) -> bool:
    found: list[Tensor] = []
    map_tensors(found.append, value)
    return bool(found)
