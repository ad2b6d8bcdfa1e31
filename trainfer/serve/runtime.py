"""Serve a deploy form on the fastest runtime that still computes it correctly on this machine.

:func:`compile` turns a model (or bundle) into a :class:`CompiledModel`, a callable
``batch -> output`` served by one of :data:`RUNTIMES`:

* ``torch`` — eager PyTorch (what a bundle serves by default);
* ``torch-channels-last`` — eager PyTorch with weights and inputs in NHWC memory format;
* ``inductor`` — ``torch.compile`` (inductor, freezing); compiling costs minutes on small
  machines and is paid again for every new batch shape, so ``"auto"`` tries it only when asked;
* ``onnxruntime`` — the deploy form exported to ONNX (:func:`trainfer.serve.export.export`, checked),
  run by ONNX Runtime's CPU provider;
* ``openvino`` — the same ONNX file compiled by OpenVINO (optional extra ``trainfer[openvino]``).

Each runtime serves some dtypes (:data:`SUPPORTED_DTYPES`): float32 everywhere; bfloat16 and
float16 in eager PyTorch, and in OpenVINO where the CPU reports them. Every candidate is verified
against the float64 deploy form on the example batch shapes and random inputs: its max error
relative to the output scale must stay within ``trainfer.numerics.TOLERANCE`` of its dtype (1e-5
for float32, 3e-2 for bfloat16, 1e-2 for float16); a reduced-precision candidate must also pass an
:class:`~trainfer.serve.gate.AccuracyGate` on ``gate_data``, without which a reduced dtype is refused.

``runtime="auto"`` measures every verified candidate on the target batch shapes, all candidates
paired in one run and alternating call by call (:func:`trainfer.bench.time_forms`), and picks the
lowest geometric mean of latency relative to eager float32; a reduced precision only by a margin
over the best float32 form, and never on a timing flagged as untrusted
(:func:`~trainfer.serve.runtime_record.choose`). The choice, every candidate's figures (or why it
was left out), the thread settings and the machine (CPU flags) form a :class:`RuntimeRecord`,
which :func:`save_record` writes into a bundle as ``runtime.json`` and
``compile(bundle, runtime="recorded")`` rebuilds (and verifies again) without measuring.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainfer.errors import BundleError, EquivalenceError, InputError, InputTypeError
from trainfer.numerics import TOLERANCE
from trainfer.recipe import ModelRecipe, recipe_of
from trainfer.serve.engines import DTYPES, CompiledModel, OpenVinoEngine, TorchEngine, openvino_precisions, ort_engine
from trainfer.serve.gate import (
    AccuracyGate,
    GateReport,
    gate_labels,
    gate_output,
    gate_report,
    logits_over,
    warn_small_gate,
)
from trainfer.serve.outputs import flatten_outputs
from trainfer.serve.runtime_record import (
    AUTO_RUNTIMES,
    MAX_WARNINGS,
    RUNTIME_FILE,
    RUNTIMES,
    SUPPORTED_DTYPES,
    CandidateRecord,
    RuntimeRecord,
    choose,
    machine_info,
    read_record,
    runtime_versions,
    save_record,
    thread_settings,
)
from trainfer.serve.source import check_class_gate, float32_copy, load_source

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

REFERENCE = "torch/float32"

#: The records, :func:`machine_info` and :func:`save_record` are documented under this module's name
#: (docs/runtimes.md); they live in :mod:`trainfer.serve.runtime_record`.
__all__ = [
    "AUTO_RUNTIMES",
    "RUNTIMES",
    "RUNTIME_FILE",
    "CandidateRecord",
    "CompiledModel",
    "RuntimeRecord",
    "compile",
    "compile_for",
    "machine_info",
    "read_record",
    "recorded_runtime",
    "save_record",
]


@dataclass
class _Source:
    """The float32 deploy form, its manifest and a float64 copy to verify against."""

    model: nn.Module
    manifest: Manifest
    reference: nn.Module
    sample_shape: tuple[int, ...]
    workdir: Path
    onnx: Path | None = None

    def onnx_file(self) -> Path:
        """The deploy form exported to ONNX once (checked by :func:`trainfer.serve.export.export`)."""
        if self.onnx is None:
            from trainfer.serve.export import export

            path = self.workdir / "model.onnx"
            example = torch.randn(2, *self.sample_shape)
            export(self.model, path, "onnx", example_inputs=example)
            self.onnx = path
        return self.onnx


def _source(model_or_bundle: Any, example_inputs: Tensor | None, workdir: Path, trust_factory: bool) -> _Source:
    """The float32 deploy form of ``model_or_bundle`` (:func:`trainfer.serve.source.load_source`) to serve."""
    source = load_source(model_or_bundle, _float32(example_inputs), trust_factory=trust_factory)
    model = float32_copy(source.model)
    return _Source(model, source.manifest, copy.deepcopy(model).double(), source.sample_shape, workdir)


def _float32(example_inputs: Tensor | None) -> Tensor | None:
    """Example inputs as float32 (a runtime serves float32 inputs; other types are refused by the source)."""
    if isinstance(example_inputs, Tensor) and example_inputs.is_floating_point():
        return example_inputs.detach().to("cpu", torch.float32)
    return example_inputs


def _engine(runtime: str, dtype: str, source: _Source, threads: int) -> Callable[[Tensor], Any]:
    if runtime in ("torch", "torch-channels-last", "inductor"):
        return TorchEngine(
            source.model, DTYPES[dtype], channels_last=runtime == "torch-channels-last", inductor=runtime == "inductor"
        )
    if runtime == "onnxruntime":
        return ort_engine(source.onnx_file(), source.manifest, threads)
    return OpenVinoEngine(source.onnx_file(), source.manifest, threads, dtype)


def _unavailable(runtime: str, dtype: str) -> str | None:
    """Why ``runtime`` cannot serve ``dtype`` here (``None``: it can)."""
    if dtype not in SUPPORTED_DTYPES[runtime]:
        return f"{runtime} serves {', '.join(SUPPORTED_DTYPES[runtime])} only"
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino", "inductor": "torch._inductor"}.get(runtime)
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module} is not installed"
    if runtime == "openvino":
        precisions = openvino_precisions()
        if not precisions:  # found on the path, but its import fails: not (properly) installed
            return "openvino cannot be imported (not installed): pip install 'trainfer[openvino]'"
        if dtype not in precisions:
            return f"OpenVINO's CPU plugin reports no {dtype} on this CPU ({', '.join(precisions)} only)"
    return None


def _verification_inputs(source: _Source, batch_sizes: Sequence[int], seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *source.sample_shape, generator=generator, dtype=torch.float64) for b in batch_sizes]


def _max_rel_error(engine: Callable[[Tensor], Any], source: _Source, inputs: list[Tensor]) -> float:
    """Max over inputs and output leaves of ``max |candidate - float64| / max |float64|``."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            _, expected = flatten_outputs(source.reference(x))
            _, got = flatten_outputs(engine(x.float()))
            for reference, candidate in zip(expected, got, strict=True):
                if tuple(candidate.shape) != tuple(reference.shape):
                    return math.inf
                difference = (candidate.double() - reference).abs().max()
                error = float(difference) / (float(reference.abs().max()) or 1.0)
                worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


def _checked_gate_data(source: _Source, data: Any, gate: AccuracyGate) -> Any:
    """``data`` (inputs, or ``(inputs, labels)``) with its labels checked for the model's outputs
    (:func:`~trainfer.serve.gate.gate_labels`, which also refuses a gate that would compare nothing),
    before any candidate is built: a label no class can be would otherwise fail each candidate's gate
    alone, and float32 be recorded. Warns when the gate has too few samples to mean much
    (:func:`~trainfer.serve.gate.warn_small_gate`)."""
    inputs, labels = data if isinstance(data, tuple) else (data, None)
    warn_small_gate(len(inputs))
    first = logits_over(source.model, inputs[:1].detach().to("cpu", torch.float32))
    checked = gate_labels(labels, gate_output(source.manifest), (len(inputs), *first.shape[1:]), gate)
    return data if labels is None else (inputs, checked)


def _gate(engine: Callable[[Tensor], Any], source: _Source, gate: AccuracyGate, data: Any) -> GateReport:
    inputs, labels = data if isinstance(data, tuple) else (data, None)
    inputs = inputs.detach().to("cpu", torch.float32)
    reference = logits_over(source.model, inputs)
    return gate_report(reference, logits_over(engine, inputs), labels, gate, gate_output(source.manifest))


def _candidate(
    runtime: str, dtype: str, source: _Source, threads: int, checks: tuple[list[Tensor], AccuracyGate, Any]
) -> tuple[CandidateRecord, Callable[[Tensor], Any] | None]:
    """Build and verify one candidate; never raises for the candidate's own failures."""
    reason = _unavailable(runtime, dtype)
    if reason is not None:
        return CandidateRecord(runtime, dtype, "unavailable", reason), None
    inputs, gate, gate_data = checks
    tolerance = TOLERANCE[DTYPES[dtype]]
    try:
        engine = _engine(runtime, dtype, source, threads)
        error = _max_rel_error(engine, source, inputs)
        report = _gate(engine, source, gate, gate_data) if gate_data is not None and dtype != "float32" else None
    except Exception as failure:  # a runtime's own exception types (onnxruntime, openvino, inductor)
        return CandidateRecord(runtime, dtype, "error", f"{type(failure).__name__}: {failure}"[:300]), None
    record = CandidateRecord(runtime, dtype, "ok", None, error, tolerance, report.to_dict() if report else None)
    if not error <= tolerance:
        record.status, record.reason = "rejected", f"max rel error {error:.2e} > {tolerance:.0e} vs float64"
    elif report is not None and not report.ok:
        record.status, record.reason = "rejected", "; ".join(report.failures())
    return record, engine if record.status == "ok" else None


def _measure(
    engines: dict[str, Callable[[Tensor], Any]], records: dict[str, CandidateRecord], source: _Source, options: dict
) -> None:
    """Median latency per batch size of every engine, paired call by call in one run; ratios to eager float32.

    Why the figures cannot be trusted (:func:`trainfer.bench.conditions.untrusted`: a starved process, a
    load above the cores, a huge spread), if anything says so, is appended to ``options["warnings"]`` as
    ``batch N: ...``, once per batch size flagged (at most :data:`~trainfer.serve.runtime_record.MAX_WARNINGS`,
    what a record keeps); ``options["sources"]``: :func:`~trainfer.bench.conditions.measured`'s clocks (tests
    inject them).
    """
    from trainfer.bench import time_forms
    from trainfer.bench.conditions import measured, untrusted

    warnings: list[str] = options.get("warnings", [])
    for batch in options["batch_sizes"]:
        x = torch.randn(batch, *source.sample_shape)
        timings, conditions = measured(
            partial(time_forms, engines, x, rounds=options["rounds"], repeats=1, warmup=2, threads=options["threads"]),
            options["threads"],
            **options.get("sources", {}),
        )
        warning = untrusted(conditions, timings)
        if warning is not None and len(warnings) < MAX_WARNINGS:
            warnings.append(f"batch {batch}: {warning}")
        for name, timing in timings.items():
            records[name].median_ms[str(batch)] = 1e3 * timing.median_s
        for name in engines:
            records[name].ratio[str(batch)] = timings[name].median_s / timings[REFERENCE].median_s


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
    rounds: int = 10,
    trust_factory: bool = False,
    extra_candidates: Callable[[_Source, int, AccuracyGate], tuple[list[Any], dict[str, Any]]] | None = None,
) -> CompiledModel:
    """Serve the deploy form of ``model_or_bundle`` on ``runtime``; see the module docstring.

    ``runtime``: a name of :data:`RUNTIMES`, ``"auto"`` (measure ``candidates``, default
    :data:`AUTO_RUNTIMES`, in each of ``dtype`` and keep the fastest verified one), ``"recorded"``
    (a bundle's ``runtime.json``) or a :class:`RuntimeRecord`. ``threads``: intra-op threads of
    every runtime (default: torch's current setting). ``gate_data``: inputs, or ``(inputs,
    labels)``, on which reduced-precision candidates must pass ``gate`` against the float form.
    A reduced ``dtype`` (bfloat16, float16) without ``gate_data`` is refused (:class:`trainfer.InputError`).
    A runtime named explicitly that fails verification raises :class:`trainfer.EquivalenceError`.
    ``trust_factory`` is :func:`trainfer.load`'s (for a bundle). ``extra_candidates(source, threads,
    gate)``: more ``(CandidateRecord, engine or None)`` pairs to measure beside the others (each
    already verified and gated by whoever made it), and ``{candidate name: what saving it needs}``;
    :mod:`trainfer.serve.gated` passes its int8 candidates so (``trainfer.compile`` with
    ``calibration=`` is that module's wrapper). An int8 record is served from its bundle's int8 form.
    """
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    for name in dtypes:
        if name not in DTYPES:
            raise InputError(f"dtype must be one of {list(DTYPES)}; got {name!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"batch_sizes must be positive ints; got {batch_sizes!r}")
    if runtime == "recorded":
        runtime = recorded_runtime(model_or_bundle)
    if isinstance(runtime, RuntimeRecord) and runtime.dtype == "int8":
        if isinstance(model_or_bundle, nn.Module):
            raise InputError("an int8 runtime record is served from its bundle's int8 form: pass the bundle path")
        from trainfer.serve.int8_form import serve_quantized

        return serve_quantized(model_or_bundle, runtime.runtime, trust_factory=trust_factory)
    if isinstance(runtime, RuntimeRecord):
        dtypes = (runtime.dtype,)  # recorded: its reduced precision passed its gate when it was compiled
        runtime = runtime.runtime
    else:
        check_gated_dtypes(dtypes, gate_data)
    if runtime != "auto" and runtime not in RUNTIMES:
        raise InputError(f"runtime must be 'auto', 'recorded' or one of {list(RUNTIMES)}; got {runtime!r}")
    names = list(candidates or AUTO_RUNTIMES) if runtime == "auto" else [runtime]
    unknown = sorted(set(names) - set(RUNTIMES))
    if unknown:
        raise InputError(f"unknown candidates {unknown}: expected names from {list(RUNTIMES)}")
    from trainfer.bench.measure import check_threads

    threads = torch.get_num_threads() if threads is None else check_threads(threads)
    artifacts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trainfer-compile-") as work:
        source = _source(model_or_bundle, example_inputs, Path(work), trust_factory)
        if gate_data is not None:
            check_class_gate(source.manifest, "trainfer.compile with gate_data (--gate-data)")
            gate_data = _checked_gate_data(source, gate_data, gate or AccuracyGate())
        checks = (_verification_inputs(source, batch_sizes), gate or AccuracyGate(), gate_data)
        pairs = [(r, d) for r in names for d in dtypes]
        if runtime == "auto" and ("torch", "float32") not in pairs:
            pairs.insert(0, ("torch", "float32"))  # the baseline of every ratio
        built = [_candidate(r, d, source, threads, checks) for r, d in pairs]
        if extra_candidates is not None and runtime == "auto":
            more, artifacts = extra_candidates(source, threads, checks[1])
            built += more
    records = {record.name: record for record, _ in built}
    warnings: list[str] = []
    engines = {record.name: engine for record, engine in built if engine is not None}
    if runtime != "auto":
        given = built[0][0]
        if given.status != "ok":
            raise EquivalenceError(f"{given.name} cannot serve this model: {given.reason}")
        chosen, chosen_by, choice = given, "given", None
    else:
        options = {"batch_sizes": batch_sizes, "rounds": rounds, "threads": threads, "warnings": warnings}
        _measure(engines, records, source, options)
        chosen, choice = choose([records[name] for name in engines], trusted=not warnings)
        chosen_by = "auto"
    record = RuntimeRecord(
        chosen.runtime,
        chosen.dtype,
        chosen_by,
        list(batch_sizes),
        list(records.values()),
        thread_settings(threads),
        machine_info(),
        runtime_versions(),
        warnings,
        choice,
    )
    recipe = recipe_of(source.model) or ModelRecipe(None, form="deploy")
    shaped = replace(recipe, input_shape=(1, *source.sample_shape))
    return CompiledModel(engines[chosen.name], record, shaped, artifacts.get(chosen.name))


def check_gated_dtypes(dtypes: Sequence[str], gate_data: Any) -> None:
    """Refuse a reduced precision (any dtype but float32) without ``gate_data`` (an :class:`InputError`).

    bf16 and float16 pass a tolerance check on random inputs, which says nothing of the accuracy on
    real data: they are served only behind an :class:`~trainfer.serve.gate.AccuracyGate` on data, as
    ``trainfer compile`` searches them only with ``--gate-data``.
    """
    reduced = [name for name in dtypes if name != "float32"]
    if reduced and gate_data is None:
        raise InputError(
            f"dtype {', '.join(reduced)} is a reduced precision, served only behind an accuracy gate: pass "
            f"gate_data=inputs or (inputs, labels) to check it on, or use dtype='float32'"
        )


def recorded_runtime(model_or_bundle: Any) -> RuntimeRecord:
    """The runtime record a bundle carries (``runtime="recorded"``); refused for a model or a bundle without one."""
    if isinstance(model_or_bundle, nn.Module):
        raise InputError("runtime='recorded' reads a bundle's runtime.json: pass the bundle path, not a model")
    record = read_record(model_or_bundle)
    if record is None:
        raise BundleError(f"bundle {str(model_or_bundle)!r} records no runtime ({RUNTIME_FILE}): run compile first")
    return record


def compile_for(model: Any, runtime: Any, spec: Any, batch_size: int) -> CompiledModel:
    """What ``Predictor(model, runtime=...)`` serves: ``model`` compiled for batches up to ``batch_size``."""
    if isinstance(model, CompiledModel):
        return model
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"runtime= compiles an nn.Module; got {type(model).__name__}")
    if spec.input_shape is None:
        raise InputError("runtime= needs the input shape (preprocess={'input_shape': ...}) to compile the model")
    sizes = sorted({1, min(batch_size, 8)})
    return compile(model, torch.randn(1, *spec.input_shape), runtime, batch_sizes=sizes)
