"""How far one output is from another: the worst error of each output leaf (:class:`OutputError`)
after a check that both have the same structure (container types, keys, lengths).

An output leaf passes when ``max |candidate - reference| <= atol + rtol * max |reference|``:
the error is measured relative to the output's scale; mismatched NaN/inf is an infinite error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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


def _leaves(output: Any, path: str = "output") -> dict[str, Any]:
    """Flatten tensors in nested tuples/lists/dicts into ``{path: leaf}``."""
    if isinstance(output, Mapping):
        return {k: v for key, value in output.items() for k, v in _leaves(value, f"{path}[{key!r}]").items()}
    if isinstance(output, (tuple, list)):
        return {k: v for i, value in enumerate(output) for k, v in _leaves(value, f"{path}[{i}]").items()}
    return {path: output}


def compare_outputs(
    reference: Any, candidate: Any, dtype: torch.dtype, rtol: float, atol: float = 0.0
) -> list[OutputError]:
    """The error of each output leaf of ``candidate`` against ``reference`` (nested tuples/lists/dicts),
    after a difference of structure (container types, keys, lengths) if there is one."""
    problem = _structure_difference(reference, candidate, "output")
    if problem is not None:
        return [OutputError(problem[0], dtype, _INF, _INF, 1.0, rtol, atol, f"output structure differs: {problem[1]}")]
    return list(_compare(_leaves(reference), _leaves(candidate), dtype, rtol, atol))


def _structure_difference(reference: Any, candidate: Any, path: str) -> tuple[str, str] | None:
    """The first place (path, what) where the containers of two outputs differ in type, keys or length."""
    containers = (Mapping, tuple, list)
    if not isinstance(reference, containers) and not isinstance(candidate, containers):
        return None
    if type(reference) is not type(candidate):
        return path, f"{type(candidate).__name__} where the reference returns {type(reference).__name__}"
    if isinstance(reference, Mapping):
        if list(reference.keys()) != list(candidate.keys()):
            return path, f"keys {list(candidate.keys())} differ from the reference's {list(reference.keys())}"
        pairs = [(f"{path}[{k!r}]", reference[k], candidate[k]) for k in reference]
    else:
        if len(reference) != len(candidate):
            return path, f"length {len(candidate)} differs from the reference's {len(reference)}"
        pairs = [(f"{path}[{i}]", r, c) for i, (r, c) in enumerate(zip(reference, candidate))]
    return next((d for p, r, c in pairs if (d := _structure_difference(r, c, p)) is not None), None)


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
            same = type(expected) is type(actual) and expected == actual
            problem = None if same else f"non-tensor outputs differ: {expected!r} vs {actual!r}"
            yield OutputError(path, dtype, 0.0 if same else _INF, 0.0 if same else _INF, 1.0, rtol, atol, problem)
        elif expected.shape != actual.shape:
            problem = f"shape {tuple(actual.shape)} differs from the reference's {tuple(expected.shape)}"
            yield OutputError(path, dtype, _INF, _INF, 1.0, rtol, atol, problem)
        else:
            yield OutputError(path, dtype, *leaf_errors(actual, expected), rtol, atol, compared=expected.numel())


_INF = float("inf")


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
