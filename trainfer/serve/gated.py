"""The reduced-precision candidates of ``trainfer.compile``: bf16 and int8, each behind the accuracy gate.

``compile(model, runtime="auto", gate=AccuracyGate(...), gate_data=(inputs, labels),
calibration=inputs)`` measures, beside the float32 runtimes:

* **bf16** — eager PyTorch in bfloat16 and OpenVINO with its ``bf16`` inference-precision hint
  (where OpenVINO's CPU plugin reports bf16; otherwise recorded ``unavailable`` with the reason);
  each within the bf16 tolerance of the float64 deploy form and passing ``gate`` on ``gate_data``;
* **int8** — the QDQ file of :func:`trainfer.quantize` (equalization, calibration on
  ``calibration``, the gate on ``gate_data`` and its sensitivity-ordered float fallback) run by
  ONNX Runtime (the runtime that gate measured) and by OpenVINO (gated again here: another
  runtime's int8 kernels round differently). A gate that no int8 form passes leaves both
  ``rejected``, with the quantizer's verdict as the reason.

The passing candidates are timed paired, call by call, in the same run as the float32 ones; the
lowest geometric mean of latency relative to eager float32 wins. :func:`save_compiled` writes
the choice into a bundle (``runtime.json``, and for int8 the int8 form itself, checked against the
float weights at every load); ``trainfer serve`` and ``Predictor.load(bundle, runtime="recorded")``
serve what was recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from trainfer.errors import InputError, QuantizationError
from trainfer.serve.gate import AccuracyGate
from trainfer.serve.runtime import (
    QUANTIZED_RUNTIMES,
    CandidateRecord,
    CompiledModel,
    _gate,
    _Source,
    _unavailable,
    save_record,
)

#: What a gated ``compile`` adds to the float32 candidates.
REDUCED_DTYPES = ("bfloat16",)

__all__ = ["REDUCED_DTYPES", "int8_candidates", "save_compiled"]

Engine = Callable[[Tensor], Any]


def int8_candidates(
    model_or_bundle: nn.Module | str | os.PathLike[str],
    source: _Source,
    threads: int,
    gate: AccuracyGate,
    gate_data: Tensor | tuple[Tensor, Tensor],
    calibration: Tensor,
) -> tuple[list[tuple[CandidateRecord, Engine | None]], Any]:
    """``onnxruntime/int8`` and ``openvino/int8`` candidates, and the :class:`QuantizedModel` they serve.

    Never raises for the candidates' own failures (a refused gate, a runtime error): those are
    recorded. The quantized model is ``None`` when no int8 form passed the gate.
    """
    from trainfer.serve.quantize import quantize

    inputs, labels = gate_data if isinstance(gate_data, tuple) else (gate_data, None)
    target = model_or_bundle if not isinstance(model_or_bundle, nn.Module) else source.model
    try:
        quantized = quantize(target, calibration, validation=inputs, labels=labels, gate=gate, threads=threads)
    except QuantizationError as refused:
        report = refused.report.gate.to_dict() if refused.report is not None else None
        reason = f"trainfer.quantize: {refused}"[:500]
        return [(CandidateRecord(r, "int8", "rejected", reason, gate=report), None) for r in QUANTIZED_RUNTIMES], None
    except Exception as failure:  # ONNX Runtime's quantizer raises its own types
        reason = f"trainfer.quantize failed: {type(failure).__name__}: {failure}"[:500]
        return [(CandidateRecord(r, "int8", "error", reason), None) for r in QUANTIZED_RUNTIMES], None
    report = quantized.report
    note = f"int8 QDQ, {len(report.float_layers)} layer(s) kept in float"
    measured = report.gate
    ort = CandidateRecord("onnxruntime", "int8", "ok", note, measured.max_rel_error, None, measured.to_dict())
    return [(ort, quantized.engine), _openvino_int8(quantized, source, threads, gate, gate_data, note)], quantized


def _openvino_int8(
    quantized: Any, source: _Source, threads: int, gate: AccuracyGate, gate_data: Any, note: str
) -> tuple[CandidateRecord, Engine | None]:
    """The same QDQ file compiled by OpenVINO, gated on its own outputs."""
    from trainfer.serve.runtime import OpenVinoEngine

    reason = _unavailable("openvino", "float32")
    if reason is not None:
        return CandidateRecord("openvino", "int8", "unavailable", reason), None
    path = source.workdir / "int8.onnx"
    path.write_bytes(quantized.onnx_bytes)
    try:
        engine = OpenVinoEngine(path, source.manifest, threads)
        report = _gate(engine, source, gate, gate_data)
    except Exception as failure:  # OpenVINO raises its own types
        return CandidateRecord("openvino", "int8", "error", f"{type(failure).__name__}: {failure}"[:300]), None
    record = CandidateRecord("openvino", "int8", "ok", note, report.max_rel_error, None, report.to_dict())
    if not report.ok:
        record.status, record.reason = "rejected", "; ".join(report.failures())
        return record, None
    return record, engine


def check_gated_arguments(runtime: Any, gate_data: Any, calibration: Any) -> None:
    """``calibration`` asks for the int8 search: it needs ``runtime="auto"`` and ``gate_data`` to gate on."""
    if calibration is None:
        return
    if runtime != "auto":
        raise InputError(f"calibration= asks compile to search int8 forms: use runtime='auto' (got {runtime!r})")
    if gate_data is None:
        raise InputError("calibration= needs gate_data= (validation inputs, or (inputs, labels)) to gate int8 on")
    if not isinstance(calibration, Tensor) or not calibration.is_floating_point() or calibration.dim() < 2:
        raise InputError("calibration= must be a float tensor batch of model inputs (N, ...)")


def save_compiled(bundle: str | os.PathLike[str], compiled: CompiledModel) -> Path:
    """Record ``compiled``'s choice in ``bundle``: ``runtime.json`` and, when it serves int8, the int8 form.

    The int8 files (``quantized.onnx``, its probes and ``quantization.json``) are written before
    ``runtime.json``, each atomically; a load checks them against the bundle's float weights.
    """
    from trainfer.serve.quantize import write_int8_form

    if compiled.record.dtype == "int8":
        quantized = getattr(compiled, "quantized", None)
        if quantized is None:
            raise InputError("this compiled model serves an int8 form it does not carry: it was loaded, not compiled")
        write_int8_form(Path(bundle), quantized)
    return save_record(bundle, compiled.record)
