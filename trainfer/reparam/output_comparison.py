"""How far one output is from another: the worst error of each output leaf (:class:`OutputError`)
after a check that both have the same structure (container types, keys, lengths). Dataclasses and
plain objects (a key/value cache) are looked into by attribute; a leaf that can be neither looked
into nor compared by its own ``==`` fails as "cannot compare".

An output leaf passes when ``max |candidate - reference| <= atol + rtol * max |reference|``:
the error is measured relative to the output's scale; mismatched NaN/inf is an infinite error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class OutputError:
    """The worst error of one output leaf (``path`` like ``output[0]['logits']``) in one dtype."""

    path: str
    dtype: torch.dtype
    max_abs_error: float
    max_rel_error: float
    scale: float
    rtol: float
    atol: float
    problem: str | None = None
    #: How many elements were compared (summed over the inputs checked); 0: an empty output.
    compared: int = 1

    @property
    def ok(self) -> bool:
        """No structural problem, and ``max_abs_error <= atol + rtol * scale``."""
        return self.problem is None and self.max_abs_error <= self.atol + self.rtol * self.scale

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        if self.problem:
            return f"{self.path} [{dtype_name(self.dtype)}]: FAIL ({self.problem})"
        return (
            f"{self.path} [{dtype_name(self.dtype)}]: max abs {self.max_abs_error:.3e}, "
            f"max rel {self.max_rel_error:.3e} (rtol {self.rtol:.0e}) {verdict}"
        )


def _attributes(value: Any) -> dict[str, Any] | None:
    """The fields of a dataclass, or the attributes of a plain object with Python's identity ``==``
    (a key/value cache, a result record), that verify looks into; ``None`` for anything else."""
    if isinstance(value, (Tensor, Mapping, tuple, list, nn.Module, type)):
        return None
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if type(value).__eq__ is not object.__eq__ or not hasattr(value, "__dict__"):
        return None
    return dict(vars(value))


def _children(value: Any) -> list[tuple[str, Any]] | None:
    """``(path suffix, child)`` of a value verify looks into (tuples, lists, mappings, dataclasses,
    plain objects' attributes); ``None`` for a leaf."""
    if isinstance(value, Mapping):
        return [(f"[{key!r}]", child) for key, child in value.items()]
    if isinstance(value, (tuple, list)):
        return [(f"[{i}]", child) for i, child in enumerate(value)]
    attributes = _attributes(value)
    return None if attributes is None else [(f".{name}", child) for name, child in attributes.items()]


def _leaves(output: Any, path: str = "output", ancestors: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Flatten nested containers and objects into ``{path: leaf}`` (an object met again inside itself
    is not followed)."""
    children = _children(output)
    if children is None:
        return {path: output}
    if id(output) in ancestors:
        return {}
    inner = ancestors | {id(output)}
    return {k: v for suffix, child in children for k, v in _leaves(child, path + suffix, inner).items()}


def compare_outputs(
    reference: Any, candidate: Any, dtype: torch.dtype, rtol: float, atol: float = 0.0
) -> list[OutputError]:
    """The error of each output leaf of ``candidate`` against ``reference`` (nested tuples/lists/dicts),
    after a difference of structure (container types, keys, lengths) if there is one."""
    problem = _structure_difference(reference, candidate, "output")
    if problem is not None:
        return [OutputError(problem[0], dtype, _INF, _INF, 1.0, rtol, atol, f"output structure differs: {problem[1]}")]
    return list(_compare(_leaves(reference), _leaves(candidate), dtype, rtol, atol))


def _structure_difference(
    reference: Any, candidate: Any, path: str, ancestors: frozenset[int] = frozenset()
) -> tuple[str, str] | None:
    """The first place (path, what) where the containers of two outputs differ in type, keys,
    attributes or length."""
    expected, actual = _children(reference), _children(candidate)
    if expected is None and actual is None:
        return None
    if type(reference) is not type(candidate) or expected is None or actual is None:
        return path, f"{type(candidate).__name__} where the reference returns {type(reference).__name__}"
    if id(reference) in ancestors:
        return None
    if [s for s, _ in expected] != [s for s, _ in actual]:
        if isinstance(reference, (tuple, list)):
            return path, f"length {len(candidate)} differs from the reference's {len(reference)}"
        what = "keys" if isinstance(reference, Mapping) else "attributes"
        return path, f"{what} {[s for s, _ in actual]} differ from the reference's {[s for s, _ in expected]}"
    inner = ancestors | {id(reference)}
    pairs = [(path + s, r, c) for (s, r), (_, c) in zip(expected, actual)]
    return next((d for p, r, c in pairs if (d := _structure_difference(r, c, p, inner)) is not None), None)


def _compare(
    reference: dict[str, Any], candidate: dict[str, Any], dtype: torch.dtype, rtol: float, atol: float
) -> Iterator[OutputError]:
    if reference.keys() != candidate.keys():
        problem: str | None = (
            f"output structure differs: reference {sorted(reference)} vs candidate {sorted(candidate)}"
        )
        yield OutputError("output", dtype, _INF, _INF, 1.0, rtol, atol, problem)
        return
    for path, expected in reference.items():
        actual = candidate[path]
        if not isinstance(expected, Tensor) or not isinstance(actual, Tensor):
            problem = _leaf_difference(expected, actual)
            same = problem is None
            yield OutputError(path, dtype, 0.0 if same else _INF, 0.0 if same else _INF, 1.0, rtol, atol, problem)
        elif expected.shape != actual.shape:
            problem = f"shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}"
            yield OutputError(path, dtype, _INF, _INF, 1.0, rtol, atol, problem)
        else:
            yield OutputError(path, dtype, *leaf_errors(actual, expected), rtol, atol, compared=expected.numel())


_INF = float("inf")


def _leaf_difference(expected: Any, actual: Any) -> str | None:
    """Why two non-tensor leaves differ, or cannot be compared; ``None`` when they are equal. A leaf
    with only identity equality (an object verify cannot look into: ``__slots__``, a module) is
    not a pass: nothing about its value was compared."""
    if expected is actual:
        return None
    if type(expected) is not type(actual):
        return f"{type(actual).__name__} where the reference returns {type(expected).__name__}"
    if type(expected).__eq__ is object.__eq__:
        return (
            f"cannot compare a {type(expected).__name__}: not a tensor, container, dataclass or object with "
            "attributes, and no == of its own"
        )
    try:
        same = bool(expected == actual)
    except (TypeError, ValueError, RuntimeError) as error:
        return f"cannot compare a {type(expected).__name__}: its == raised {error}"
    return None if same else f"non-tensor outputs differ: {expected!r} vs {actual!r}"


def leaf_errors(actual: Tensor, expected: Tensor) -> tuple[float, float, float]:
    """``(max |a - e|, that / max |e|, max |e|)`` over finite entries; mismatched NaN/inf -> infinite error."""
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    if not (bool(finite.all()) and bool(torch.isfinite(actual).all())):  # masked copies only when needed
        if not torch.equal(finite, torch.isfinite(actual)) or not torch.equal(
            actual[~finite].nan_to_num(), expected[~finite].nan_to_num()
        ):
            return _INF, _INF, 1.0
        actual, expected = actual[finite], expected[finite]
    if expected.numel() == 0:  # nothing to compare (the caller counts the elements compared)
        return 0.0, 0.0, 0.0
    difference, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    relative = difference / scale if scale > 0 else (0.0 if difference == 0 else _INF)
    return difference, relative, scale


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
