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
:class:`~trainfer.serve.gate.AccuracyGate` on ``gate_data`` when given.

``runtime="auto"`` measures every verified candidate on the target batch shapes, all candidates
paired in one run and alternating call by call (:func:`trainfer.bench.time_forms`), and picks the
lowest geometric mean of latency relative to eager float32. The choice, every candidate's figures
(or why it was left out), the thread settings and the machine (CPU flags) form a
:class:`RuntimeRecord`, which :func:`save_record` writes into a bundle as ``runtime.json`` and
``compile(bundle, runtime="recorded")`` rebuilds (and verifies again) without measuring.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import queue
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from trainfer.atomic import atomic_file
from trainfer.errors import BundleError, EquivalenceError, InputError, InputTypeError
from trainfer.extras import require
from trainfer.jsonfile import read_json
from trainfer.numerics import TOLERANCE
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
from trainfer.serve.gate import AccuracyGate, GateReport, gate_report, logits_over
from trainfer.serve.int8_ops import check_int8_ops
from trainfer.serve.outputs import flatten_outputs
from trainfer.serve.runtime_names import QUANTIZED_RUNTIMES, RUNTIMES, SUPPORTED_DTYPES

#: What ``runtime="auto"`` tries unless told otherwise (inductor: see the module docstring).
AUTO_RUNTIMES = ("torch", "torch-channels-last", "onnxruntime", "openvino")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNTIME_FILE = "runtime.json"
#: The int8 form a bundle may carry (``trainfer quantize``): a QDQ ONNX file and its record.
QUANTIZED_FILE = "quantized.onnx"
QUANTIZATION_FILE = "quantization.json"
TORCH_RUNTIMES = ("torch", "torch-channels-last", "inductor")
REFERENCE = "torch/float32"
_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

__all__ = [
    "AUTO_RUNTIMES",
    "RUNTIMES",
    "RUNTIME_FILE",
    "CandidateRecord",
    "CompiledModel",
    "RuntimeRecord",
    "bundle_model",
    "compile",
    "compile_for",
    "machine_info",
    "read_record",
    "save_record",
    "serve_quantized",
]


# --------------------------------------------------------------------------- records
@dataclass
class CandidateRecord:
    """One runtime/dtype pair: whether it could serve, its error, and its latency per batch size.

    ``status``: ``ok``, ``unavailable`` (not installed, or the CPU lacks the dtype), ``rejected``
    (failed verification or the gate) or ``error`` (building or running it raised). ``median_ms``
    and ``ratio`` (to eager float32, measured in the same run) are keyed by batch size.
    """

    runtime: str
    dtype: str
    status: str
    reason: str | None = None
    max_rel_error: float | None = None
    tolerance: float | None = None
    gate: dict[str, Any] | None = None
    median_ms: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.runtime}/{self.dtype}"

    @property
    def score(self) -> float:
        """Geometric mean of the latency ratios (infinite when not measured)."""
        values = list(self.ratio.values())
        return math.exp(sum(map(math.log, values)) / len(values)) if values else math.inf


@dataclass
class RuntimeRecord:
    """Which runtime serves the model, why, on which machine, with which thread settings."""

    runtime: str
    dtype: str
    chosen_by: str
    batch_sizes: list[int]
    candidates: list[CandidateRecord]
    threads: dict[str, int]
    machine: dict[str, Any]
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "runtime record") -> RuntimeRecord:
        """Rebuild a record read from a file; anything malformed raises :class:`BundleError`."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
        runtime: Any = data.get("runtime")  # untrusted JSON: any value, checked here
        if not isinstance(runtime, str):
            raise BundleError(f"{source}: expected 'runtime' to be a string, got {type(runtime).__name__}")
        int8 = runtime in QUANTIZED_RUNTIMES and data.get("dtype") == "int8"
        if not int8 and data.get("dtype") not in SUPPORTED_DTYPES.get(runtime, ()):
            raise BundleError(
                f"{source}: runtime {runtime!r} with dtype {data.get('dtype')!r} is not one of "
                f"{ {name: list(dtypes) for name, dtypes in SUPPORTED_DTYPES.items()} }"
            )
        unexpected = sorted(set(data) - {f.name for f in fields(cls)})
        if unexpected:
            raise BundleError(f"{source}: unexpected fields: {unexpected}")
        from trainfer.serve.runtime_schema import check_record

        check_record(data, source)
        try:
            candidates = [CandidateRecord(**entry) for entry in data.get("candidates") or []]
            return cls(**{**data, "candidates": candidates})
        except TypeError as error:
            raise BundleError(f"{source}: unexpected fields: {error}") from None

    def table(self) -> str:
        """The candidates' figures as a text table, best first."""
        sizes = [str(b) for b in self.batch_sizes]
        lines = [f"{'candidate':<28}{'status':<11}{'rel error':>10}" + "".join(f"{'x b' + s:>9}" for s in sizes)]
        for c in sorted(self.candidates, key=lambda c: (c.status != "ok", c.score)):
            error = f"{c.max_rel_error:.1e}" if c.max_rel_error is not None else "-"
            ratios = "".join(f"{c.ratio[s]:>9.3g}" if s in c.ratio else f"{'-':>9}" for s in sizes)
            mark = " *" if (c.runtime, c.dtype) == (self.runtime, self.dtype) else ""
            note = f"  ({c.reason})" if c.reason else ""
            lines.append(f"{c.name + mark:<28}{c.status:<11}{error:>10}{ratios}{note}")
        threads = ", ".join(f"{k} {v}" for k, v in self.threads.items())
        flags = " ".join(f for f in _FLAGS if self.machine.get("flags", {}).get(f)) or "none of interest"
        lines.append(f"chosen: {self.runtime}/{self.dtype} ({self.chosen_by}); latency x eager float32, same run")
        lines.append(f"threads: {threads}; machine: {self.machine.get('cpu')} [{flags}]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def machine_info() -> dict[str, Any]:
    """The CPU's name, core count, the instruction-set flags that decide bf16/int8 speed, torch's ISA level."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in _FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_hardware": bool({"avx512_bf16", "amx_bf16"} & flags),
        "int8_dot_product": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
    }


def save_record(bundle: str | os.PathLike[str], record: RuntimeRecord) -> Path:
    """Write ``record`` as ``runtime.json`` into the bundle directory (atomically); return its path."""
    directory = Path(bundle)
    if not (directory / "manifest.json").is_file():
        raise BundleError(f"no trainfer bundle at {str(directory)!r}: expected a directory holding manifest.json")
    with atomic_file(directory / RUNTIME_FILE) as tmp:
        tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
    return directory / RUNTIME_FILE


def read_record(bundle: str | os.PathLike[str]) -> RuntimeRecord | None:
    """The bundle's recorded runtime choice, or ``None`` when it carries none."""
    file = Path(bundle) / RUNTIME_FILE
    if not file.is_file():
        return None
    from trainfer.serve.runtime_schema import MAX_RECORD_BYTES

    data = read_json(file, max_bytes=MAX_RECORD_BYTES, error=BundleError)
    return RuntimeRecord.from_dict(data, repr(str(file)))


# --------------------------------------------------------------------------- engines
class TorchEngine:
    """Eager (or inductor-compiled) PyTorch in ``dtype``; inputs cast in, outputs returned as float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, *, channels_last: bool = False, inductor: bool = False):
        self.dtype, self.channels_last = dtype, channels_last
        served = copy.deepcopy(model).to(dtype).eval()
        if channels_last:
            # Module.to takes memory_format (torch's own docs); its overload stubs leave it out
            served = served.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = torch.compile(served, dynamic=False, options={"freezing": True}) if inductor else served

    def __call__(self, batch: Tensor) -> Any:
        batch = batch.to(self.dtype)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            output = self.model(batch)
        return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.is_floating_point() else t, output)


def ort_engine(path: Path, manifest: dict[str, Any], threads: int) -> Callable[[Tensor], Any]:
    """An ONNX Runtime session on ``path`` (all graph optimisations, ``threads`` intra-op threads)."""
    ort = require("onnxruntime", "onnx", "the onnxruntime runtime")
    from trainfer.serve.onnx_runtime import OnnxModel

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return OnnxModel(path, {**manifest, "input": {**manifest["input"], "dtype": "float32"}}, options)


class OpenVinoEngine:
    """An OpenVINO CPU compilation of an ONNX file at ``precision`` (``f32``, ``bf16``, ``f16``).

    Safe to call from any number of threads: an OpenVINO infer request serves one inference at a
    time (a second concurrent ``infer`` raises "Infer Request is busy" or overwrites the first's
    outputs), so each call takes a request of its own from a pool, created on demand, copies its
    outputs and puts the request back. The compiled model itself is shared (OpenVINO allows that).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], threads: int, dtype: str = "float32"):
        ov = require("openvino", "openvino", "the openvino runtime")
        core = ov.Core()
        hint = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.compiled = core.compile_model(str(path), "CPU", config)
        except RuntimeError as error:  # e.g. external data outside the model's directory: OpenVINO refuses it
            raise InputError(f"openvino cannot compile {str(path)!r}: {' '.join(str(error).split())[:500]}") from None
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()  # idle requests; at most one per thread
        self.names = [output.get_any_name() for output in self.compiled.outputs]
        self.manifest = manifest

    def __call__(self, batch: Tensor) -> Any:
        from trainfer.serve.onnx_runtime import structured

        try:
            request = self.requests.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            result = request.infer({0: batch.detach().to("cpu", torch.float32).contiguous().numpy()})
            values = [torch.from_numpy(result[output].copy()) for output in self.compiled.outputs]
        finally:
            self.requests.put(request)
        return structured(values, self.names, self.manifest)


def openvino_precisions() -> tuple[str, ...]:
    """The dtypes OpenVINO's CPU plugin computes in on this machine (empty if OpenVINO is missing)."""
    try:
        ov = importlib.import_module("openvino")
    except ImportError:
        return ()
    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    names = {"FP32": "float32", "BF16": "bfloat16", "FP16": "float16"}
    return tuple(name for key, name in names.items() if key in capabilities)


# --------------------------------------------------------------------------- compiled model
class CompiledModel:
    """The deploy form served by one runtime: call it on a batch; ``record`` says what and why."""

    def __init__(
        self, engine: Callable[[Tensor], Any], record: RuntimeRecord, recipe: ModelRecipe, quantized: Any = None
    ):
        """``quantized``: the :class:`~trainfer.serve.quantize.QuantizedModel` an int8 choice serves (to save it)."""
        self.engine, self.record, self.quantized = engine, record, quantized
        attach_recipe(self, recipe)

    def __call__(self, batch: Tensor) -> Any:
        return self.engine(batch)

    def __repr__(self) -> str:
        return f"CompiledModel({self.record.runtime}/{self.record.dtype}, chosen {self.record.chosen_by})"


@dataclass
class _Source:
    """The float32 deploy form, its manifest and a float64 copy to verify against."""

    model: nn.Module
    manifest: dict[str, Any]
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


def _source(model_or_bundle: Any, example_inputs: Tensor | None, workdir: Path) -> _Source:
    from trainfer.reparam.deploy import deploy
    from trainfer.serve.bundle import build_manifest, load, read_manifest

    recorded = None
    if isinstance(model_or_bundle, nn.Module):
        model = model_or_bundle
        shape = getattr(recipe_of(model), "input_shape", None)
    else:
        model, recorded = load(model_or_bundle), read_manifest(model_or_bundle)
        shape = recorded["input"].get("shape")
    if example_inputs is None:
        if not shape:
            raise InputError("compile needs example_inputs (a batch of the model's inputs): the input shape is unknown")
        example_inputs = torch.randn(*shape)
    if not isinstance(example_inputs, Tensor) or not example_inputs.is_floating_point():
        given = type(example_inputs).__name__
        raise InputTypeError(f"example_inputs must be a floating-point tensor batch; got {given}")
    example = example_inputs.detach().to("cpu", torch.float32)
    if getattr(recipe_of(model), "form", None) != "deploy" and not hasattr(model, "trainfer_report"):
        model = deploy(model.to("cpu"), example)
    model = _carrying_records(copy.deepcopy(model).to("cpu", torch.float32).eval(), model)
    manifest = recorded if recorded is not None else build_manifest(model, example_inputs=example)
    return _Source(model, manifest, copy.deepcopy(model).double(), tuple(example.shape[1:]), workdir)


def _carrying_records(copied: nn.Module, original: nn.Module) -> nn.Module:
    """``copied`` with the original's recipe and ``trainfer_report`` (an FX deep copy drops them)."""
    if hasattr(original, "trainfer_report"):
        copied.trainfer_report = copy.deepcopy(original.trainfer_report)
    return attach_recipe(copied, recipe_of(original))


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
    if runtime == "openvino" and dtype not in openvino_precisions():
        return f"OpenVINO's CPU plugin reports no {dtype} on this CPU ({', '.join(openvino_precisions())} only)"
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


def _gate(engine: Callable[[Tensor], Any], source: _Source, gate: AccuracyGate, data: Any) -> GateReport:
    inputs, labels = data if isinstance(data, tuple) else (data, None)
    inputs = inputs.detach().to("cpu", torch.float32)
    return gate_report(logits_over(source.model, inputs), logits_over(engine, inputs), labels, gate)


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
    """Median latency per batch size of every engine, paired call by call in one run; ratios to eager float32."""
    from trainfer.bench import time_forms

    for batch in options["batch_sizes"]:
        x = torch.randn(batch, *source.sample_shape)
        timings = time_forms(engines, x, rounds=options["rounds"], repeats=1, warmup=2, threads=options["threads"])
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
    extra_candidates: Callable[[_Source, int, AccuracyGate], tuple[list[Any], dict[str, Any]]] | None = None,
) -> CompiledModel:
    """Serve the deploy form of ``model_or_bundle`` on ``runtime``; see the module docstring.

    ``runtime``: a name of :data:`RUNTIMES`, ``"auto"`` (measure ``candidates``, default
    :data:`AUTO_RUNTIMES`, in each of ``dtype`` and keep the fastest verified one), ``"recorded"``
    (a bundle's ``runtime.json``) or a :class:`RuntimeRecord`. ``threads``: intra-op threads of
    every runtime (default: torch's current setting). ``gate_data``: inputs, or ``(inputs,
    labels)``, on which reduced-precision candidates must pass ``gate`` against the float form.
    ``extra_candidates(source, threads, gate)``: more ``(CandidateRecord, engine or None)`` pairs
    to verify-free measure beside the others, and ``{candidate name: what saving it needs}``
    (:mod:`trainfer.serve.gated` passes its int8 candidates so; ``trainfer.compile`` with
    ``calibration=`` is that module's wrapper).
    A runtime named explicitly that fails verification raises :class:`trainfer.EquivalenceError`.
    """
    dtypes = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    for name in dtypes:
        if name not in DTYPES:
            raise InputError(f"dtype must be one of {list(DTYPES)}; got {name!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"batch_sizes must be positive ints; got {batch_sizes!r}")
    if runtime == "recorded":
        runtime = _recorded(model_or_bundle)
    if isinstance(runtime, RuntimeRecord) and runtime.dtype == "int8":
        if isinstance(model_or_bundle, nn.Module):
            raise InputError("an int8 runtime record is served from its bundle's int8 form: pass the bundle path")
        return serve_quantized(model_or_bundle, runtime.runtime)
    if isinstance(runtime, RuntimeRecord):
        dtypes = (runtime.dtype,)
        runtime = runtime.runtime
    if runtime != "auto" and runtime not in RUNTIMES:
        raise InputError(f"runtime must be 'auto', 'recorded' or one of {list(RUNTIMES)}; got {runtime!r}")
    names = list(candidates or AUTO_RUNTIMES) if runtime == "auto" else [runtime]
    unknown = sorted(set(names) - set(RUNTIMES))
    if unknown:
        raise InputError(f"unknown candidates {unknown}: expected names from {list(RUNTIMES)}")
    threads = threads or torch.get_num_threads()
    artifacts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="trainfer-compile-") as work:
        source = _source(model_or_bundle, example_inputs, Path(work))
        checks = (_verification_inputs(source, batch_sizes), gate or AccuracyGate(), gate_data)
        pairs = [(r, d) for r in names for d in dtypes]
        if runtime == "auto" and ("torch", "float32") not in pairs:
            pairs.insert(0, ("torch", "float32"))  # the baseline of every ratio
        built = [_candidate(r, d, source, threads, checks) for r, d in pairs]
        if extra_candidates is not None and runtime == "auto":
            more, artifacts = extra_candidates(source, threads, checks[1])
            built += more
    records = {record.name: record for record, _ in built}
    engines = {record.name: engine for record, engine in built if engine is not None}
    if runtime != "auto":
        given = built[0][0]
        if given.status != "ok":
            raise EquivalenceError(f"{given.name} cannot serve this model: {given.reason}")
        chosen, chosen_by = given, "given"
    else:
        _measure(engines, records, source, {"batch_sizes": batch_sizes, "rounds": rounds, "threads": threads})
        chosen, chosen_by = min((records[name] for name in engines), key=lambda r: r.score), "auto"
    record = RuntimeRecord(
        chosen.runtime,
        chosen.dtype,
        chosen_by,
        list(batch_sizes),
        list(records.values()),
        _thread_settings(threads),
        machine_info(),
        _versions(),
    )
    recipe = recipe_of(source.model) or ModelRecipe(None, form="deploy")
    served = artifacts.get(chosen.name)
    return CompiledModel(engines[chosen.name], record, replace(recipe, input_shape=(1, *source.sample_shape)), served)


def _recorded(model_or_bundle: Any) -> RuntimeRecord:
    if isinstance(model_or_bundle, nn.Module):
        raise InputError("runtime='recorded' reads a bundle's runtime.json: pass the bundle path, not a model")
    record = read_record(model_or_bundle)
    if record is None:
        raise BundleError(f"bundle {str(model_or_bundle)!r} records no runtime ({RUNTIME_FILE}): run compile first")
    return record


def _thread_settings(threads: int) -> dict[str, int]:
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "measured_with": threads,
        "onnxruntime_intra_op": threads,
        "openvino_inference": threads,
    }


def _versions() -> dict[str, str]:
    versions: dict[str, str] = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            continue
    return versions


# --------------------------------------------------------------------------- serving bundles
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


def bundle_model(
    bundle: str | os.PathLike[str], overrides: dict[str, Any], **load_options: Any
) -> tuple[Any, dict[str, Any]]:
    """The model ``Predictor.load`` serves for a bundle, when it is not the plain PyTorch one.

    ``runtime="recorded"`` serves what the bundle's ``runtime.json`` names (its int8 form when
    the record chose int8); otherwise a bundle carrying an int8 form serves it (unless ``runtime``
    names a PyTorch runtime). Returns ``(model or None,
    the overrides left for the Predictor)``. ``load_options`` (``factory``, ``trust_factory``) go to
    :func:`trainfer.load` of the float form an int8 form is checked against.
    """
    runtime = overrides.get("runtime")
    if runtime == "recorded" and (Path(bundle) / RUNTIME_FILE).is_file():  # what it names, int8 included
        record = _recorded(bundle)
        if record.dtype == "int8":
            rest = {key: value for key, value in overrides.items() if key != "runtime"}
            return serve_quantized(bundle, record.runtime, **load_options), rest
        return None, {**overrides, "runtime": record}
    if (Path(bundle) / QUANTIZATION_FILE).is_file() and runtime not in TORCH_RUNTIMES:
        chosen = None if runtime in (None, "auto", "recorded") else runtime
        served = serve_quantized(bundle, chosen, **load_options)
        return served, {key: value for key, value in overrides.items() if key != "runtime"}
    if runtime == "recorded":
        return None, {**overrides, "runtime": _recorded(bundle)}  # raises: the bundle records none
    return None, overrides


def serve_quantized(bundle: str | os.PathLike[str], runtime: str | None = None, **load_options: Any) -> CompiledModel:
    """The int8 form of a bundle (``quantized.onnx``), once checked against the bundle's float form.

    The file must match its recorded sha256, and then agree with the float weights on the probe
    inputs stored beside it (:func:`trainfer.serve.served_checks.check_int8_form`; the float form is loaded with
    ``load_options``, :func:`trainfer.load`'s ``factory``/``trust_factory``): a digest proves
    nothing, whoever replaces the file recomputes it. ``runtime``: ``onnxruntime`` or ``openvino``
    (default: the runtime the file was made and gated for, as its settings record).
    """
    import hashlib

    from trainfer.serve.bundle import load, read_manifest
    from trainfer.serve.served_checks import check_int8_form, read_probes

    directory = Path(bundle)
    entry = _quantization_entry(directory)
    runtime = runtime or _quantized_for(entry)
    if runtime not in QUANTIZED_RUNTIMES:
        raise InputError(f"an int8 form runs on {list(QUANTIZED_RUNTIMES)}; got runtime {runtime!r}")
    file = directory / QUANTIZED_FILE
    if not file.is_file():
        raise BundleError(f"bundle {str(directory)!r} lacks its int8 form {QUANTIZED_FILE!r}")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise BundleError(
            f"{str(file)!r} does not match {QUANTIZATION_FILE}: sha256 expected {entry.get('sha256')}, got {digest}"
        )
    check_int8_ops(data, repr(str(file)))  # before any runtime parses it: only the operators trainfer writes
    manifest = read_manifest(directory)
    threads = torch.get_num_threads()
    try:
        engine = int8_engine(runtime, file, manifest, threads)
    except ImportError:
        raise
    except Exception as error:  # the file is untrusted: onnxruntime and OpenVINO raise their own types
        raise BundleError(f"{runtime} cannot load the int8 form {str(file)!r}: {error}"[:2000]) from None
    shape = manifest["input"].get("shape")
    if not shape:
        raise BundleError(f"bundle {str(directory)!r} records no input shape to check its int8 form on")
    probes = read_probes(directory, entry, shape[1:])
    check_int8_form(engine, load(directory, **load_options), probes, repr(str(file)))
    report = entry.get("report")
    gate = report.get("gate") if isinstance(report, dict) else None
    candidate = CandidateRecord(runtime, "int8", "ok", "accuracy gate measured at quantization", gate=gate)
    record = RuntimeRecord(
        runtime, "int8", "bundle", [], [candidate], _thread_settings(threads), machine_info(), _versions()
    )
    recipe = ModelRecipe(manifest.get("factory"), manifest["config"], manifest["input"].get("shape"), "deploy")
    return CompiledModel(engine, record, recipe)


def int8_engine(runtime: str, path: Path, manifest: dict[str, Any], threads: int) -> Callable[[Tensor], Any]:
    """The engine of ``runtime`` (one of :data:`QUANTIZED_RUNTIMES`) on the QDQ file at ``path``."""
    if runtime == "onnxruntime":
        return ort_engine(path, manifest, threads)
    return OpenVinoEngine(path, manifest, threads)


def _quantized_for(entry: dict[str, Any]) -> str:
    """The runtime an int8 record says its file was made and gated for (older records: ONNX Runtime)."""
    report = entry.get("report")
    settings = report.get("settings") if isinstance(report, dict) else None
    runtime = settings.get("runtime", QUANTIZED_RUNTIMES[0]) if isinstance(settings, dict) else QUANTIZED_RUNTIMES[0]
    if runtime not in QUANTIZED_RUNTIMES:
        raise BundleError(
            f"{QUANTIZATION_FILE}: the int8 form is made for {runtime!r}, not one of {list(QUANTIZED_RUNTIMES)}"
        )
    return str(runtime)


def _quantization_entry(directory: Path) -> dict[str, Any]:
    file = directory / QUANTIZATION_FILE
    entry = read_json(file, error=BundleError)
    if (
        not isinstance(entry, dict)
        or entry.get("format") != "trainfer-quantized"
        or entry.get("file") != QUANTIZED_FILE
    ):
        raise BundleError(
            f'{str(file)!r} is not a trainfer int8 record (expected "format": "trainfer-quantized", '
            f'"file": "{QUANTIZED_FILE}")'
        )
    return entry
