"""Checks of public arguments at the API boundary, with one message form.

Every check names the parameter, what it expects and what it was given (type and value), e.g.
``top_k must be an integer >= 1 or None; got str '3'``. A value of the wrong type raises
:class:`~trainfer.errors.InputTypeError` (a ``TypeError``), a value of the right type out of
range :class:`~trainfer.errors.InputError` (a ``ValueError``): code that caught the built-in
exceptions keeps working, and ``except trainfer.TrainferError`` catches both.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from trainfer.errors import InputError, InputTypeError

__all__ = ["check_integer", "check_keywords", "check_number", "check_path", "check_tolerance", "check_type", "given"]


def given(value: Any) -> str:
    """``value`` as an error message shows it: its type and a short repr (``str '3'``)."""
    return f"{type(value).__name__} {value!r:.80}"


def check_type(name: str, value: Any, types: Any, expected: str) -> Any:
    """``value`` if it is an instance of ``types`` (a type, tuple or union); else :class:`InputTypeError`."""
    if not isinstance(value, types):
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}")
    return value


def check_integer(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False
) -> Any:
    """``value`` as an ``int`` (numpy integers too; ``bool`` and ``2.5`` are not), at least ``minimum``
    and at most ``maximum`` (both: ``must be an integer in [1, 10000]``).

    ``optional``: ``None`` is accepted and returned as is.
    """
    if maximum is not None:
        low = minimum if minimum is not None else "-inf"
        bound = f" in [{low}, {maximum}]"
    else:
        bound = f" >= {minimum}" if minimum is not None else ""
    expected = f"an integer{bound}{' or None' if optional else ''}"
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}") from None
    if maximum is not None and not ((minimum is None or number >= minimum) and number <= maximum):
        raise InputError(f"{name} must be an integer{bound}; got {number}")
    if minimum is not None and number < minimum:
        raise InputError(f"{name} must be >= {minimum}; got {number}")
    return number


def check_number(name: str, value: Any, *, low: float, high: float) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``bool``, strings and arrays of several
    elements are not numbers; numpy scalars and one-element tensors are)."""
    expected = f"a number in [{low:g}, {high:g}]"
    if isinstance(value, bool | str | bytes) or not hasattr(value, "__float__"):
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # several elements; a meta tensor holds no value
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(f"{name} must be {expected}; got {number!r}")
    return number


def check_tolerance(name: str, value: Any, *, zero: bool = False) -> float | None:
    """A tolerance: ``None`` (the per-dtype default), or a finite ``float`` > 0 (``>= 0`` where ``zero``).

    ``max |candidate - reference| <= atol + rtol * scale`` holds for no pair at all when a tolerance is
    NaN, and for every pair when it is infinite: neither checks anything, so both are refused, as are
    negative tolerances, ``bool`` and strings.
    """
    expected = f"a finite number {'>=' if zero else '>'} 0 or None"
    if value is None:
        return None
    if isinstance(value, bool | str | bytes) or not hasattr(value, "__float__"):
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise InputError(f"{name} must be {expected}; got {number!r}")
    return number


def check_path(name: str, value: Any) -> Path:
    """``value`` (a ``str`` or ``os.PathLike``) as a :class:`~pathlib.Path`."""
    if not isinstance(value, str | os.PathLike):
        raise InputTypeError(f"{name} must be a path (str or os.PathLike); got {given(value)}")
    return Path(value)


def check_keywords(call: str, keywords: Mapping[str, Any], allowed: Collection[str]) -> None:
    """Refuse keyword arguments of ``call`` outside ``allowed``, naming them and the allowed ones."""
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise InputTypeError(f"{call} got unknown keyword argument(s) {unknown}: expected some of {sorted(allowed)}")
