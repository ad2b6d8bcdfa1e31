"""Selections that rounding may flip: follow the reference's choice where the candidate's is a near-tie.

A selection (``topk``, ``sort``/``argsort``, ``argmax``/``argmin``, ``max``/``min`` along a dim)
or a comparison (``>``, ``<``, ``>=``, ``<=``, the mask of ``y[y > threshold]``) turns a tiny
numeric difference into a discrete one: two scores 1 ulp apart swap places, and the boxes
gathered with the winning index are 96 px apart. Folding rounds every kernel once, so a folded
detector's float32 output can differ from its eval form's at every near-tie while both compute
the same function. The policy (docs/deploy.md, "Selections"):

* float64 is compared strictly: there the fold's rounding (1e-16) is far below any real tie;
* in the model's dtype, the candidate runs while :func:`following` replays the reference's
  selections, in execution order (aten ops seen by a ``TorchDispatchMode``): where the candidate
  selects differently, its choice is replaced by the reference's only if it is a near-tie, i.e.
  the candidate's own values at the two choices differ by at most ``atol + rtol * max |input|``
  (for a comparison: ``|a - b|`` at every flipped element is within that of 0). A selection that
  differs by more is kept, so the output comparison shows it. The count of replaced selections
  is reported.

Replaying stops at the first selection whose op or shape differs from the reference's next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Selections", "following", "recording"]

_aten = torch.ops.aten
_VALUES_AND_INDICES = {_aten.topk.default, _aten.sort.default, _aten.sort.stable, _aten.max.dim, _aten.min.dim}
_INDICES = {_aten.argmax.default, _aten.argmin.default}
_COMPARISONS = {
    getattr(getattr(_aten, name), overload) for name in ("gt", "lt", "ge", "le") for overload in ("Scalar", "Tensor")
}
_TRACKED = _VALUES_AND_INDICES | _INDICES | _COMPARISONS

Record = tuple[Any, Any]


class Selections:
    """The selections one run made (op, result), and how many a following run took over as near-ties."""

    def __init__(self) -> None:
        self.made: list[Record] = []
        self.ties = 0


class _Recorder(TorchDispatchMode):
    def __init__(self, selections: Selections) -> None:
        super().__init__()
        self.selections = selections

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _TRACKED:
            self.selections.made.append((func, _detached(out)))
        return out


class _Follower(TorchDispatchMode):
    def __init__(self, reference: Selections, selections: Selections, rtol: float, atol: float) -> None:
        super().__init__()
        self.queue, self.selections, self.rtol, self.atol = list(reference.made), selections, rtol, atol

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _TRACKED or not self.queue:
            return out
        expected_func, expected = self.queue.pop(0)
        if expected_func is not func or _choice(expected).shape != _choice(out).shape:
            self.queue = []  # the runs no longer line up: stop following
            return out
        if torch.equal(_choice(expected), _choice(out)):
            return out
        replaced = _near_tie(func, args, kwargs, out, expected, self.rtol, self.atol)
        if replaced is None:
            return out
        self.selections.ties += 1
        return replaced


@contextmanager
def recording() -> Iterator[Selections]:
    """Record the selections made in the block (the reference's run)."""
    selections = Selections()
    with _Recorder(selections):
        yield selections


@contextmanager
def following(reference: Selections, rtol: float, atol: float = 0.0) -> Iterator[Selections]:
    """Run the block (the candidate's run) taking the reference's selections where its own are near-ties."""
    selections = Selections()
    with _Follower(reference, selections, rtol, atol):
        yield selections


def _detached(out: Any) -> Any:
    return tuple(t.detach().clone() for t in out) if isinstance(out, tuple) else out.detach().clone()


def _choice(out: Any) -> Tensor:
    """The discrete part of a selection's result: the indices, or the comparison's mask."""
    return out[1] if isinstance(out, tuple) else out


def _dim(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The dim a selection works along (``None``: over the flattened input, ``argmax()``)."""
    position = {_aten.topk.default: 2, _aten.sort.default: 1, _aten.max.dim: 1, _aten.min.dim: 1}
    if func in position:
        index = position[func]
        return int(args[index]) if len(args) > index else int(kwargs.get("dim", -1))
    if func is _aten.sort.stable:
        return int(kwargs.get("dim", -1))
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return None if dim is None else int(dim)


def _near_tie(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, expected: Any, rtol: float, atol: float
) -> Any:
    """The reference's selection in the candidate's terms if the candidate's own is a near-tie, else ``None``."""
    source = args[0]
    if not isinstance(source, Tensor) or not source.is_floating_point():
        return None
    finite = source[torch.isfinite(source)]
    tolerance = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0)
    if func in _COMPARISONS:
        other = args[1]
        flipped = out != expected
        gap = (source - other).expand_as(flipped)[flipped] if isinstance(other, Tensor) else source[flipped] - other
        return expected if bool((gap.abs() <= tolerance).all()) else None
    dim = _dim(func, args, kwargs)
    indices = _choice(expected)
    take: Callable[[Tensor], Tensor]
    if dim is None:
        take = source.flatten().take
    elif indices.dim() < source.dim():  # keepdim=False
        take = lambda i: source.gather(dim, i.unsqueeze(dim)).squeeze(dim)  # noqa: E731
    else:
        take = lambda i: source.gather(dim, i)  # noqa: E731
    chosen, own = take(indices), take(_choice(out))
    if not bool(((chosen - own).abs() <= tolerance).all()):
        return None
    return (chosen, indices) if isinstance(out, tuple) else indices
