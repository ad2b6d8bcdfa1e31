"""The reduced-precision candidates of ``trainfer.compile``: bf16 and int8, each behind the accuracy gate.

``compile(model, runtime="auto", gate=AccuracyGate(...), gate_data=(inputs, labels),
calibration=inputs)`` measures, beside the float32 runtimes:

* **bf16** — eager PyTorch in bfloat16 and OpenVINO with its ``bf16`` inference-precision hint
  (where OpenVINO's CPU plugin reports bf16; otherwise recorded ``unavailable`` with the reason);
  each within the bf16 tolerance of the float64 deploy form and passing ``gate`` on ``gate_data``;
* **int8** — for each of ONNX Runtime and OpenVINO, the QDQ file :func:`trainfer.quantize` makes
  for that runtime (equalization, calibration on ``calibration``, quantizers placed where that
  runtime runs them fastest, the gate measured on that runtime over ``gate_data``, and its
  sensitivity-ordered float fallback). A gate that no int8 form passes leaves the candidate
  ``rejected``, with the quantizer's verdict as the reason.

The passing candidates are timed paired, call by call, in the same run as the float32 ones; the
lowest geometric mean of latency relative to eager float32 wins. :func:`save_compiled` writes
the choice into a bundle (``runtime.json``, and for int8 the int8 form itself, checked against the
float weights at every load); ``trainfer serve`` and ``Predictor.load(bundle, runtime="recorded")``
serve what was recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.errors import BundleError, InputError, QuantizationError
from trainfer.serve.engines import CompiledModel
from trainfer.serve.gate import AccuracyGate, warn_gated_on_calibration
from trainfer.serve.runtime import _Source, _unavailable
from trainfer.serve.runtime import compile as compile_float
from trainfer.serve.runtime_record import QUANTIZED_RUNTIMES, CandidateRecord, RuntimeRecord, read_record, save_record

#: What a gated ``compile`` adds to the float32 candidates.
REDUCED_DTYPES = ("bfloat16",)

__all__ = ["REDUCED_DTYPES", "choice_note", "compile", "int8_candidates", "save_compiled", "searched_kinds"]

Engine = Callable[[Tensor], Any]


def compile(
    model_or_bundle: nn.Module | str | os.PathLike[str],
    example_inputs: Tensor | None = None,
    runtime: str | RuntimeRecord = "auto",
    dtype: str | Sequence[str] = "float32",
    *,
    batch_sizes: Sequence[int] = (1, 8),
    threads: int | None = None,
    candidates: Sequence[str] | None = None,
    gate: AccuracyGate | None = None,
    gate_data: Tensor | tuple[Tensor, Tensor] | None = None,
    calibration: Tensor | None = None,
    rounds: int = 10,
    trust_factory: bool = False,
) -> CompiledModel:
    """Serve ``model_or_bundle``'s deploy form on the fastest runtime that computes it correctly here.

    ``model_or_bundle``: a model (deployed first when it is a training form; left untouched) or a
    bundle path. ``example_inputs``: a batch the model takes (a bundle's recorded input shape
    otherwise). ``runtime``: ``"auto"`` (measure every candidate, keep the fastest verified one),
    a name of :data:`~trainfer.serve.runtime_record.RUNTIMES`, ``"recorded"`` (a bundle's
    ``runtime.json``) or a :class:`~trainfer.serve.runtime_record.RuntimeRecord`. ``dtype``: one
    dtype or several (``"float32"``, ``"bfloat16"``, ``"float16"``); a reduced one needs ``gate_data``.

    Keywords: ``batch_sizes``, the batch shapes verified and timed; ``threads``, intra-op threads
    of every runtime (default: torch's setting); ``candidates``, the runtimes ``"auto"`` measures
    (default :data:`~trainfer.serve.runtime_record.AUTO_RUNTIMES`); ``gate``, the
    :class:`~trainfer.serve.gate.AccuracyGate` reduced precisions must pass (default thresholds
    otherwise) on ``gate_data``, inputs or ``(inputs, labels)``; ``calibration``, model inputs that
    ask for the gated search (with ``runtime="auto"`` and ``gate_data``): bf16 (:data:`REDUCED_DTYPES`)
    and one int8 candidate per runtime are measured too (see the module docstring); ``rounds``,
    timing rounds per batch size; ``trust_factory``, :func:`trainfer.load`'s for a bundle.

    Returns a :class:`~trainfer.serve.engines.CompiledModel` (``.record``: the choice and every
    candidate's figures). Bad arguments raise :class:`trainfer.InputError`; a runtime named
    explicitly that fails verification, :class:`trainfer.EquivalenceError`. The float search is
    :func:`trainfer.serve.runtime.compile`'s.
    """
    check_gated_arguments(runtime, gate_data, calibration)
    options: dict[str, Any] = {
        "batch_sizes": batch_sizes, "threads": threads, "candidates": candidates, "gate": gate,
        "gate_data": gate_data, "rounds": rounds, "trust_factory": trust_factory,
    }  # fmt: skip
    if calibration is None or gate_data is None:
        return compile_float(model_or_bundle, example_inputs, runtime, dtype, **options)
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    dtypes = (*dtypes, *(name for name in REDUCED_DTYPES if name not in dtypes))

    runtimes = tuple(name for name in QUANTIZED_RUNTIMES if name in (candidates or QUANTIZED_RUNTIMES))
    if runtimes and _calibrated_on_gate_data(calibration, gate_data):
        warn_gated_on_calibration(
            "compile: the int8 candidates are calibrated on the gate data (calibration= holds the gate_data= "
            "inputs; the CLI's --calibration defaults to --gate-data)",
            "Pass calibration= (CLI: --calibration) with other inputs than the gate's, e.g. training inputs",
        )

    def int8(source: _Source, threads: int, gate: AccuracyGate) -> tuple[list[Any], dict[str, Any]]:
        return int8_candidates(model_or_bundle, source, threads, gate, gate_data, calibration, runtimes)

    return compile_float(model_or_bundle, example_inputs, runtime, dtypes, extra_candidates=int8, **options)


def _calibrated_on_gate_data(calibration: Tensor, gate_data: Tensor | tuple[Tensor, Tensor]) -> bool:
    """Whether ``calibration`` holds the inputs of ``gate_data`` (the same tensor, or equal ones)."""
    inputs = gate_data[0] if isinstance(gate_data, tuple) else gate_data
    if calibration is inputs:
        return True
    return isinstance(inputs, Tensor) and inputs.shape == calibration.shape and torch.equal(inputs, calibration)


def int8_candidates(
    model_or_bundle: nn.Module | str | os.PathLike[str],
    source: _Source,
    threads: int,
    gate: AccuracyGate,
    gate_data: Tensor | tuple[Tensor, Tensor],
    calibration: Tensor,
    runtimes: Sequence[str] = QUANTIZED_RUNTIMES,
) -> tuple[list[tuple[CandidateRecord, Engine | None]], dict[str, Any]]:
    """One ``<runtime>/int8`` candidate per runtime of ``runtimes`` (those of :data:`QUANTIZED_RUNTIMES`
    that ``compile``'s ``candidates=`` names, all by default), and the int8 forms that passed.

    Each is :func:`trainfer.quantize` made for that runtime (its quantizer placement) and gated
    there, fallback search included. Never raises for a candidate's own failure (a refused
    gate, a runtime error): it is recorded. Returns ``(candidates, {name: QuantizedModel})``.
    """
    built, passed = [], {}
    for runtime in runtimes:
        record, quantized = _int8_candidate(runtime, model_or_bundle, source, threads, gate, gate_data, calibration)
        built.append((record, quantized.engine if quantized is not None else None))
        if quantized is not None:
            passed[record.name] = quantized
    return built, passed


def _int8_candidate(
    runtime: str,
    model_or_bundle: Any,
    source: _Source,
    threads: int,
    gate: AccuracyGate,
    gate_data: Any,
    calibration: Tensor,
) -> tuple[CandidateRecord, Any]:
    from trainfer.serve.quantize import quantize

    reason = _unavailable(runtime, "float32")
    if reason is not None:
        return CandidateRecord(runtime, "int8", "unavailable", reason), None
    inputs, labels = gate_data if isinstance(gate_data, tuple) else (gate_data, None)
    target = model_or_bundle if not isinstance(model_or_bundle, nn.Module) else source.model
    try:
        quantized = quantize(
            target, calibration, validation=inputs, labels=labels, gate=gate, threads=threads, runtime=runtime
        )
    except QuantizationError as refused:
        verdict = refused.report.gate.to_dict() if refused.report is not None else None
        return CandidateRecord(runtime, "int8", "rejected", f"trainfer.quantize: {refused}"[:500], gate=verdict), None
    except Exception as failure:  # ONNX Runtime's quantizer and OpenVINO raise their own types
        reason = f"trainfer.quantize failed: {type(failure).__name__}: {failure}"[:500]
        return CandidateRecord(runtime, "int8", "error", reason), None
    report = quantized.report
    note = f"int8 QDQ placed for {runtime}, {len(report.float_layers)} layer(s) kept in float"
    verdict = report.gate
    return CandidateRecord(runtime, "int8", "ok", note, verdict.max_rel_error, None, verdict.to_dict()), quantized


def check_gated_arguments(runtime: Any, gate_data: Any, calibration: Any) -> None:
    """``calibration`` asks for the int8 search: it needs ``runtime="auto"`` and ``gate_data`` (one label per input)."""
    if calibration is None:
        return
    if runtime != "auto":
        raise InputError(f"calibration= asks compile to search int8 forms: use runtime='auto' (got {runtime!r})")
    if gate_data is None:
        raise InputError("calibration= needs gate_data= (validation inputs, or (inputs, labels)) to gate int8 on")
    if not isinstance(calibration, Tensor) or not calibration.is_floating_point() or calibration.dim() < 2:
        raise InputError("calibration= must be a float tensor batch of model inputs (N, ...)")
    if isinstance(gate_data, tuple) and len(gate_data) == 2 and len(gate_data[0]) != len(gate_data[1]):
        inputs, labels = len(gate_data[0]), len(gate_data[1])
        raise InputError(f"gate_data= has {inputs} inputs but {labels} labels: one label per input")


def save_compiled(bundle: str | os.PathLike[str], compiled: CompiledModel) -> Path:
    """Record ``compiled``'s choice in ``bundle``: ``runtime.json`` and, when it serves int8, the int8 form.

    The int8 files (``quantized.onnx``, its probes and ``quantization.json``) are written before
    ``runtime.json``, each atomically; a load checks them against the bundle's float weights. A
    float32 or bf16 choice leaves the bundle holding what it uses: an int8 form an earlier compile
    wrote is removed once ``runtime.json`` is in place (:func:`~trainfer.serve.int8_form.retire_int8_form`:
    only trainfer's own files, crash-safe; a removal a crash interrupted is finished here too).
    A ``trainfer quantize`` bundle's own int8 form, and every other file, is left as it is.
    """
    from trainfer.serve.int8_form import MADE_BY, compile_made, retire_int8_form, write_int8_form

    directory = Path(bundle)
    int8 = compiled.record.dtype == "int8"
    if int8:
        quantized = compiled.quantized
        if quantized is None:
            raise InputError("this compiled model serves an int8 form it does not carry: it was loaded, not compiled")
        write_int8_form(directory, quantized.onnx_bytes, quantized.probes, quantized.report.to_dict(), MADE_BY[1])
    stale = not int8 and compile_made(directory, _recorded_int8(directory))
    saved = save_record(bundle, compiled.record)
    retire_int8_form(directory, stale)
    return saved


def _recorded_int8(bundle: Path) -> bool:
    """Whether the bundle's ``runtime.json`` (before it is replaced) chose int8; an unreadable one did not."""
    try:
        previous = read_record(bundle)
    except BundleError:
        return False
    return previous is not None and previous.dtype == "int8"


def choice_note(record: RuntimeRecord, gated: bool) -> str | None:
    """Why a search's float32 choice left bf16 and int8 aside (``None`` when nothing needs saying).

    ``gated``: whether the search had gate data (``trainfer compile`` and ``trainfer serve --compile`` say it alike).
    """
    if not gated:
        return "bf16 and int8 were not considered: no gate data was given (--gate-data, --labels)"
    if record.dtype != "float32" or record.choice:  # the record's own note says why a faster one was left aside
        return None
    passed = any(c.status == "ok" and c.dtype != "float32" for c in record.candidates)
    why = "bf16/int8 forms passed the gate but measured slower" if passed else "no bf16 or int8 form passed the gate"
    return f"{why}: float32 stays chosen"


def searched_kinds(options: dict[str, Any]) -> str:
    """What a search with :func:`compile`'s keyword ``options`` considers, in words (gate data: bf16, int8 too)."""
    return "float32, bf16 and int8" if options.get("gate_data") is not None else "float32"
