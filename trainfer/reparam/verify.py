"""Do two forms of a model compute the same function? Measure it, and say where they part.

:func:`verify` runs a *reference* and a *candidate* on the example inputs and on random inputs of
the same shapes (every floating-point tensor of the inputs, inside lists, tuples and dicts too, is
drawn anew), in each requested dtype, and compares every output leaf (tensors inside tuples,
lists and dicts are matched by position/key, inside dataclasses and plain objects such as a
key/value cache by attribute name). The two outputs must have the same structure: the same
container types (an ``OrderedDict`` or a ``ModelOutput`` is not a plain ``dict``), the same keys
or attributes in the same order, the same lengths. Other non-tensor leaves compare by their own
``==``; a leaf with neither attributes to look into nor an ``==`` of its own (``__slots__``, identity
equality) fails as "cannot compare": nothing about its value would be checked. An output passes when

    max |candidate - reference| <= atol + rtol * max |reference|

i.e. the error is measured relative to the output's scale. A check must compare something: an
output leaf that holds no element on every input checked (``y[y > threshold]`` with nothing over
the threshold, a detector with no detection) fails, asking for inputs where it holds data, unless
``allow_empty=True`` says that is expected; where it holds data on some inputs, those are compared.
The default ``rtol`` is
``trainfer.numerics.TOLERANCE`` of the least precise dtype involved: the dtype the models run in,
and the dtype their weights were stored in (a float32 fold cast to float64 still carries float32
rounding, so it is held to float32's tolerance; fold a float64 copy to check at 1e-9).

When the forms differ, both run again under :func:`trainfer.capture.capture` and the first module
(in the reference's execution order) whose output differs from its counterpart in the candidate
is named: counterparts share a qualified name, or are paired explicitly through ``pairs``. A
module the candidate rebuilt by its own conversion (``opaque``: a protocol like DBB's
``switch_to_deploy()`` may keep a name such as ``block.nonlinear`` while feeding it another
input) is compared as a whole; names inside it are never paired.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.capture import capture
from trainfer.errors import InputTypeError
from trainfer.numerics import TOLERANCE
from trainfer.reparam.example_inputs import as_arguments, as_keywords, map_tensors
from trainfer.reparam.output_comparison import OutputError, compare_outputs, leaf_errors
from trainfer.reparam.ties import following, recording
from trainfer.validate import check_tolerance

__all__ = [
    "Equivalence",
    "OutputError",
    "as_arguments",
    "as_keywords",
    "cast_plain_tensors",
    "compare_outputs",
    "map_tensors",
    "model_dtype",
    "verify",
]


@dataclass
class Equivalence:
    """Result of :func:`verify`: per-output, per-dtype errors and, on failure, where the forms part."""

    outputs: list[OutputError] = field(default_factory=list)
    divergence: str | None = None
    inputs_checked: int = 0
    #: Selections (top-k, argmax, thresholds) where the candidate took the reference's choice over its
    #: own near-tie (``verify(..., near_ties=True)``; :mod:`trainfer.reparam.ties`).
    near_ties: int = 0

    @property
    def ok(self) -> bool:
        """At least one output was compared and every output passed."""
        return bool(self.outputs) and all(output.ok for output in self.outputs)

    @property
    def max_abs_error(self) -> float:
        """The largest absolute error over all outputs and dtypes (NaN if nothing was compared)."""
        return max((o.max_abs_error for o in self.outputs), default=float("nan"))

    @property
    def max_rel_error(self) -> float:
        """The largest error relative to its output's scale, over all outputs and dtypes (NaN if none)."""
        return max((o.max_rel_error for o in self.outputs), default=float("nan"))

    def __str__(self) -> str:
        lines = [f"equivalence: {'ok' if self.ok else 'FAILED'} over {self.inputs_checked} inputs"]
        if self.near_ties:
            lines[0] += f" ({self.near_ties} near-tied selections followed the reference's)"
        lines += [f"  {output}" for output in self.outputs]
        if self.divergence:
            lines.append(f"  first divergence: module {self.divergence!r}")
        return "\n".join(lines)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 if none)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    random_inputs: int = 2,
    dtypes: Sequence[torch.dtype | None] = (torch.float64, None),
    pairs: Mapping[str, str] | None = None,
    opaque: Collection[str] = (),
    seed: int = 0,
    example_kwargs: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
    near_ties: bool = False,
) -> Equivalence:
    """Compare ``candidate`` with ``reference`` in eval mode; neither model is modified.

    ``example_inputs``: a tensor or a tuple of positional arguments (a list of tensors passed as
    one argument: ``([t1, t2],)``); ``example_kwargs``: keyword arguments. ``allow_empty=True``
    lets an output that is empty on every input pass (by default that fails: nothing was compared).
    ``near_ties=True``: where the candidate's selection (top-k, sort, argmax, a threshold's mask)
    differs from the reference's only between values within the tolerance, it takes the
    reference's (:mod:`trainfer.reparam.ties`); for checks in a rounding dtype, never for float64.

    ``dtypes``: ``None`` stands for the reference's own dtype. ``random_inputs``: how many random
    inputs (``randn`` of the example shapes, seeded by ``seed``) are checked besides the examples.
    ``pairs`` maps candidate module names to reference module names for divergence localisation
    (modules with equal names are paired anyway); ``opaque`` names reference modules whose
    submodules have no counterpart in the candidate (the module itself still has one).
    """
    for role, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"{role} must be an nn.Module; got {type(model).__name__}")
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol, zero=True)
    arguments = as_arguments(example_inputs, example_kwargs)
    keywords = as_keywords(example_kwargs)
    stored = {model_dtype(reference), model_dtype(candidate)}
    result = Equivalence()
    for dtype in dict.fromkeys(d or model_dtype(reference) for d in dtypes):
        tolerance = rtol if rtol is not None else max(TOLERANCE.get(d, 1e-5) for d in {dtype, *stored})
        ref, cand = _eval_copy(reference, dtype), _eval_copy(candidate, dtype)
        inputs = list(_inputs((arguments, keywords), dtype, random_inputs, seed))
        errors, ties = _compare_all(ref, cand, inputs, dtype, tolerance, atol or 0.0, allow_empty, near_ties)
        result.near_ties += ties
        result.outputs += errors
        result.inputs_checked += len(inputs)
        if result.divergence is None and not all(e.ok for e in errors):
            result.divergence = _first_divergence(
                ref, cand, inputs, tolerance, atol or 0.0, dict(pairs or {}), tuple(opaque)
            )
    return result


def _eval_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in eval mode and ``dtype``: itself if it already is (running it then changes nothing)."""
    ready = not any(m.training for m in model.modules()) and all(
        t.dtype == dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()
    )
    return model if ready else cast_plain_tensors(copy.deepcopy(model).to(dtype).eval(), dtype)


def cast_plain_tensors(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast, in place, the floating-point tensors modules keep in plain attributes (not parameters
    nor buffers: a cache ``self.anchors`` built by ``forward``) to ``dtype``, as ``Module.to`` does
    for parameters and buffers; return ``model``."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and isinstance(value, Tensor) and value.is_floating_point():
                setattr(module, name, value.to(dtype))
    return model


Call = tuple[tuple[Any, ...], dict[str, Any]]


def _inputs(call: Call, dtype: torch.dtype, count: int, seed: int) -> Iterator[Call]:
    """The example arguments in ``dtype``, then ``count`` random ones of the same shapes.

    Random values are drawn in float64 and then cast, so every dtype checks the same points.
    """
    yield map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, call)
    generator = torch.Generator().manual_seed(seed)

    def draw(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, dtype)

    for _ in range(count):
        yield map_tensors(draw, call)


def _compare_all(
    ref: nn.Module,
    cand: nn.Module,
    inputs: list[Call],
    dtype: torch.dtype,
    rtol: float,
    atol: float,
    allow_empty: bool,
    near_ties: bool,
) -> tuple[list[OutputError], int]:
    """The worst error of each output leaf over ``inputs`` (a leaf empty on all of them fails unless
    ``allow_empty``), and how many near-tied selections the candidate took from the reference."""
    worst: dict[str, OutputError] = {}
    compared: dict[str, int] = {}
    ties = 0
    with torch.no_grad():
        for args, kwargs in inputs:
            if near_ties:
                with recording() as selections:
                    expected = ref(*args, **kwargs)
                with following(selections, rtol, atol) as followed:
                    actual = cand(*args, **kwargs)
                ties += followed.ties
            else:
                expected, actual = ref(*args, **kwargs), cand(*args, **kwargs)
            for error in compare_outputs(expected, actual, dtype, rtol, atol):
                previous = worst.get(error.path, error)
                compared[error.path] = compared.get(error.path, 0) + error.compared
                worst[error.path] = max(previous, error, key=lambda e: (not e.ok, e.max_rel_error))
    for path, error in worst.items():
        error.compared = compared[path]
        if error.compared == 0 and error.problem is None and not allow_empty:
            error.problem = (
                f"empty on every one of the {len(inputs)} inputs checked, so nothing was compared; "
                "verify on inputs where it holds data, or pass allow_empty=True"
            )
    return list(worst.values()), ties


def _record(name: str, module: nn.Module, output: Any) -> Tensor | None:
    return output.detach().clone() if isinstance(output, Tensor) else None


def _first_divergence(
    ref: nn.Module,
    cand: nn.Module,
    inputs: list[Call],
    rtol: float,
    atol: float,
    pairs: dict[str, str],
    opaque: tuple[str, ...],
) -> str | None:
    """The first reference module whose output differs from its candidate counterpart's, on any input."""
    for args, kwargs in inputs:
        with torch.no_grad(), capture(ref, _record) as expected, capture(cand, _record) as actual:
            ref(*args, **kwargs)
            cand(*args, **kwargs)
        counterpart = {pairs.get(name, name): name for name in actual}
        for name, value in expected.items():
            other = actual[counterpart[name]] if name in counterpart else None
            if name == "" or value is None or other is None or other.shape != value.shape:
                continue
            if any(name.startswith(f"{outer}.") or outer == "" for outer in opaque):
                continue
            absolute, _, scale = leaf_errors(other, value)
            if absolute > atol + rtol * scale:
                return name
    return None
