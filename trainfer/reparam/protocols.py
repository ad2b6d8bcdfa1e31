"""The conversion methods model zoos give their blocks, called and checked one module at a time.

Re-parameterizable blocks carry their own conversion: ``reparameterize()`` (MobileOne, FastViT,
timm), ``switch_to_deploy()`` (RepVGG, ACNet, DBB official repositories) or ``fuse()`` (timm's
LeViT, EfficientViT, TinyViT, RepViT). Two conventions exist and both are accepted: the method
converts the module in place (returns ``None`` or the module itself), or it returns a new module
that takes the old one's place in its parent (timm's ``setattr(parent, name, child.fuse())``).

A conversion is only as exact as its author made it: DBB builds its average-pool kernel with
``torch.zeros`` (the default dtype, float32, so ``1/9`` is rounded), timm's ``fuse()`` copies
fused weights into a freshly built ``nn.Conv2d`` (float32 by default). Such a model is
float32-exact at best, and a float64 proof of equivalence would reject it. So each method runs
with torch's default dtype set to the module's own (float64 inside ``deploy``): what it creates
with the default dtype is then as precise as its weights. What is still not exact (an explicit
``dtype=torch.float32``, a numpy float32 constant) is caught: when example inputs are given,
:func:`apply_protocols`

1. runs the model once, recording the first call (inputs, output) of every module that has a
   protocol;
2. visits modules outermost first; for one with a protocol it keeps a copy, calls the method, casts
   what the method created to the module's dtype, and runs the converted module on the recorded
   inputs: if its output is within ``rtol`` (float64: 1e-11 of the output's scale, a hundredth of
   the model-level tolerance) of the recorded one, the conversion stays; otherwise (or if the
   method raised) the copy is put back, the conversion is listed as *rejected* and the module's
   children are visited in turn, so trainfer's own folder converts whatever no exact protocol did.

With ``undo_inexact=False`` every conversion is checked the same way but kept as it is (the
result then names the inexact ones); without example inputs nothing is checked.

Methods are called quietly: what they print is discarded, and a ``verbose`` parameter (Ultralytics'
``fuse(verbose=True)`` prints a model summary and profiles its GFLOPs) is given ``False``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainfer.capture import snapshot
from trainfer.numerics import TOLERANCE
from trainfer.reparam.verify import compare_outputs, model_dtype

__all__ = ["PROTOCOLS", "ProtocolCall", "ProtocolLog", "apply_protocols"]

#: Methods of the model-zoo conventions that turn a block into its inference form.
PROTOCOLS = ("reparameterize", "switch_to_deploy", "fuse")


@dataclass
class ProtocolCall:
    """One protocol call: ``module`` (qualified name, ``""`` = the model), ``method``, what became of it.

    ``exact``: whether the converted module reproduced its recorded output (``None``: not checked).
    """

    module: str
    method: str
    kept: bool
    exact: bool | None = None
    note: str = ""

    @property
    def call(self) -> str:
        """``"name.method()"`` (``model`` for the root)."""
        return f"{self.module or 'model'}.{self.method}()"

    def __str__(self) -> str:
        return f"{self.call}: {self.note}" if self.note else self.call


@dataclass
class ProtocolLog:
    """Every protocol call :func:`apply_protocols` made, in visiting order."""

    calls: list[ProtocolCall] = field(default_factory=list)

    @property
    def kept(self) -> list[ProtocolCall]:
        """Conversions that stayed in the model."""
        return [c for c in self.calls if c.kept]

    @property
    def rejected(self) -> list[ProtocolCall]:
        """Conversions undone (not exact, or the method raised): the folder handled those modules."""
        return [c for c in self.calls if not c.kept]

    @property
    def converted(self) -> list[str]:
        """Names of the modules converted by their own protocol (their insides differ from the original's)."""
        return [c.module for c in self.kept]


def apply_protocols(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    rtol: float | None = None,
    undo_inexact: bool = True,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ProtocolLog]:
    """Call each outermost module's protocol; keep a conversion only if it is exact on the example inputs.

    ``model`` is converted in place; the returned module is ``model`` unless the root's own
    protocol returned a new module. ``example_inputs`` (positional arguments of ``model``) switch
    the per-module check on (with ``example_kwargs``, its keyword arguments); ``rtol`` is its
    tolerance relative to each output's scale (default ``TOLERANCE`` of the model's dtype / 100);
    ``undo_inexact=False`` keeps inexact conversions (still recorded as such). Only methods
    callable without arguments are used.
    """
    log = ProtocolLog()
    if not any(_protocol_of(module) for module in model.modules()):
        return model, log
    records = _record_calls(model, example_inputs, dict(example_kwargs or {})) if example_inputs is not None else None
    return _Converter(records, rtol, undo_inexact, log).convert(model, ""), log


def _protocol_of(module: nn.Module) -> str | None:
    """The first of :data:`PROTOCOLS` that ``module`` has as a method callable without arguments."""
    return next((m for m in PROTOCOLS if _callable_without_arguments(getattr(module, m, None))), None)


def _callable_without_arguments(method: Any) -> bool:
    if not callable(method) or isinstance(method, nn.Module):
        return False
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters
    )


# --- recording ------------------------------------------------------------------------------------


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


@contextmanager
def _recording(model: nn.Module) -> Iterator[dict[str, _Call]]:
    """Record the first call of every module with a protocol, by qualified name (hooks always removed)."""
    records: dict[str, _Call] = {}
    handles = []

    def before(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in records:
                records[name] = _Call(snapshot(args), snapshot(kwargs))

        return hook

    def after(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if records[name].output is None:
                records[name].output = snapshot(output)

        return hook

    try:
        for name, module in model.named_modules():
            if _protocol_of(module) is not None:
                handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
                handles.append(module.register_forward_hook(after(name)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _record_calls(
    model: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any]
) -> dict[str, _Call]:
    with _recording(model) as records, torch.no_grad():
        model(*example_inputs, **example_kwargs)
    return records


# --- converting -----------------------------------------------------------------------------------


class _Converter:
    """Visit modules outermost first, converting each with its own protocol where that is exact."""

    def __init__(self, records: dict[str, _Call] | None, rtol: float | None, undo: bool, log: ProtocolLog):
        self.records, self.rtol, self.undo, self.log = records, rtol, undo, log

    def convert(self, module: nn.Module, name: str) -> nn.Module:
        """``module`` with its own protocol applied if that is exact, else with its children converted."""
        method = _protocol_of(module)
        if method is not None:
            converted = self._try(module, name, method)
            if converted is not None:
                return converted
        for child_name, child in list(module.named_children()):
            replacement = self.convert(child, f"{name}.{child_name}" if name else child_name)
            if replacement is not child:
                module._modules[child_name] = replacement
        return module

    def _try(self, module: nn.Module, name: str, method: str) -> nn.Module | None:
        """Apply ``module.method()``; the converted module, or ``None`` (module restored) if rejected."""
        dtype = model_dtype(module)
        original = copy.deepcopy(module)
        try:
            with torch.no_grad(), _default_dtype(dtype):
                result = _call_quietly(getattr(module, method))
        except Exception as error:  # noqa: BLE001 - a model's own conversion code can raise anything
            _restore(module, original)
            self._log(name, method, False, None, f"raised {_describe(error)}; left to trainfer's folder")
            return None
        converted = result if isinstance(result, nn.Module) else module
        converted.to(dtype)  # what the method built (a fresh nn.Conv2d) has the default dtype
        call = self.records.get(name) if self.records is not None else None
        if call is None:
            note = "not run on the example inputs, unchecked" if self.records is not None else ""
            self._log(name, method, True, None, note)
            return converted
        problem = _check(converted, call, dtype, self.rtol)
        if problem is None:
            self._log(name, method, True, True)
            return converted
        if not self.undo:
            self._log(name, method, True, False, problem)
            return converted
        _restore(module, original)
        self._log(name, method, False, False, f"{problem}; trainfer folded the original instead")
        return None

    def _log(self, name: str, method: str, kept: bool, exact: bool | None, note: str = "") -> None:
        self.log.calls.append(ProtocolCall(name, method, kept, exact, note))


#: The per-module check is this much stricter than the model-level tolerance: an exact conversion's
#: own rounding is ~1e-15 in float64, a float32 constant's ~1e-8 of its branch; the margin keeps
#: small per-module errors that pass from adding up past the model-level check.
_MARGIN = 100


def _check(converted: nn.Module, call: _Call, dtype: torch.dtype, rtol: float | None) -> str | None:
    """Why ``converted`` does not reproduce the recorded call (``None``: it does)."""
    tolerance = rtol if rtol is not None else TOLERANCE.get(dtype, 1e-5) / _MARGIN
    try:
        with torch.no_grad():
            output = converted(*call.args, **call.kwargs)
    except Exception as error:  # noqa: BLE001 - the converted module is the model's code too
        return f"the converted module raised {_describe(error)}"
    failed = [e for e in compare_outputs(call.output, output, dtype, tolerance) if not e.ok]
    if not failed:
        return None
    worst = max(failed, key=lambda e: e.max_rel_error)
    if worst.problem:
        return f"the converted module's output differs ({worst.problem})"
    return (
        f"not exact in {str(dtype).removeprefix('torch.')} (max rel error {worst.max_rel_error:.1e} "
        f"> {tolerance:.0e} on the example inputs)"
    )


def _call_quietly(method: Any) -> Any:
    """``method()``, its printing discarded and ``verbose=False`` given where it takes ``verbose``."""
    quiet = {"verbose": False} if "verbose" in inspect.signature(method).parameters else {}
    with contextlib.redirect_stdout(io.StringIO()):
        return method(**quiet)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` (floating dtypes only), restored on exit."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _restore(module: nn.Module, original: nn.Module) -> None:
    """Put ``original``'s state back into ``module`` (the same object, so parents need no update)."""
    module.__dict__.clear()
    module.__dict__.update(original.__dict__)


def _describe(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
