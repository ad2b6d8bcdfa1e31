"""int8 post-training quantization of a deploy form, accuracy-gated, with a per-layer sensitivity report.

:func:`quantize` runs, on the float32 deploy form of a model or bundle:

1. **cross-layer equalization** (:func:`trainfer.reparam.equalize.equalize`, exact, verified in float64):
   folded RepVGG kernels carry per-channel outliers that per-tensor activation ranges cannot
   absorb; equalization evens them out without changing the function;
2. **export** of the equalized form to ONNX (:func:`trainfer.serve.export.export`, checked);
3. **static quantization** by ONNX Runtime (``quantize_static``): QDQ format, per-channel
   symmetric int8 weights, uint8 activations calibrated (MinMax by default) on
   ``calibration_data``. Why this backend: it is maintained with the runtime that executes the
   file, needs no model changes (the graph is already the plain deploy form), its QDQ output is
   a standard ONNX file that ONNX Runtime and OpenVINO both run (no pickle, no custom ops), and
   it works on every x86 CPU (it does not require VNNI or AMX, which the torchao x86 flow assumes
   for speed). On a CPU without VNNI the u8s8 dot product saturates 16-bit sums, so weights use
   7 bits there (``reduce_range``, ONNX Runtime's own advice), recorded in the report;
4. **the accuracy gate** (:class:`trainfer.serve.gate.AccuracyGate`; by default class, or binary decision,
   agreement >= 99 % with the float deploy form and accuracy drop <= 0.5 points on labelled data; for a
   regressor, RMS error <= 0.1 standard deviations of the float outputs and MAE increase <= 10 % against
   real targets), measured with the quantized file running in ONNX Runtime;
5. if the gate fails, **fallback**: the layers are ranked by sensitivity (network-output SQNR
   with only that layer's weights and input fake-quantized, in PyTorch) and the most sensitive are
   kept in float one at a time until the gate passes; past ``max_float_layers`` it refuses with
   :class:`QuantizationError`, naming the figures.

The result (:class:`QuantizedModel`) serves the int8 form and saves as a bundle: the equalized
float deploy form (``model.safetensors`` + ``manifest.json``), ``quantized.onnx`` (the QDQ file,
manifest inside), ``probes.safetensors`` (up to 32 validation inputs on which both forms agree) and
``quantization.json`` (their sha256 and the report). ``Predictor.load`` and ``trainfer predict``
serve the int8 form of such a bundle once it agrees with the float weights on those probes
(:mod:`trainfer.serve.served_checks`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from trainfer.errors import InputError, QuantizationError
from trainfer.serve.calibration import calibration_inputs
from trainfer.serve.engines import int8_engine
from trainfer.serve.gate import (
    AccuracyGate,
    GateOutput,
    GateReport,
    gate_labels,
    gate_output,
    gate_report,
    logits_over,
    warn_gated_on_calibration,
    warn_small_gate,
)
from trainfer.serve.int8_form import write_int8_form
from trainfer.serve.runtime_record import machine_info
from trainfer.serve.sensitivity import LayerSensitivity, sensitivity
from trainfer.serve.served_checks import MAX_INT8_REL_ERROR, select_probes
from trainfer.serve.source import check_class_gate, float32_copy, load_source
from trainfer.validate import check_type

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Where the quantizers go, per runtime that executes the file (ONNX Runtime's ``extra_options``).
#: ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv, so its file
#: quantizes every conv's input *and* output; OpenVINO runs the quantizers it reads as operations
#: of their own, and the conv-output pairs are 22 extra requantizations on repvgg_a0 (1.09-1.21x
#: the CPU time of the NNCF placement, which quantizes inputs only; docs/runtimes.md). The file
#: for OpenVINO therefore quantizes conv and linear inputs only, and the network output stays float.
PLACEMENT: dict[str, dict[str, Any]] = {
    "onnxruntime": {},
    "openvino": {"OpTypesToExcludeOutputQuantization": ["Conv", "Gemm"]},
}
_CALIBRATION_BATCH = 32

__all__ = ["LayerSensitivity", "QuantizationError", "QuantizationReport", "QuantizedModel", "quantize"]


# --------------------------------------------------------------------------- reports
@dataclass
class QuantizationReport:
    """Gate verdict, sensitivity ranking, float fallbacks and the settings that made the int8 form."""

    gate: GateReport
    sensitivity: list[LayerSensitivity]
    float_layers: list[str]
    attempts: list[str]
    settings: dict[str, Any]
    equalization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate.to_dict(),
            "sensitivity": [asdict(layer) for layer in self.sensitivity],
            "float_layers": self.float_layers,
            "attempts": self.attempts,
            "settings": self.settings,
            "equalization": self.equalization,
        }

    def __str__(self) -> str:
        lines = [f"int8 form: {self.gate}"]
        lines.append(f"layers kept in float: {', '.join(self.float_layers) or 'none'}")
        lines += [f"  attempt: {attempt}" for attempt in self.attempts]
        lines.append(f"{'layer (most sensitive first)':<28}{'SQNR dB':>9}{'weight dB':>10}   weight range per channel")
        lines += [str(layer) for layer in self.sensitivity]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the quantized model
@dataclass
class QuantizedModel:
    """The int8 form (served by ONNX Runtime) beside the float form it was made from."""

    float_model: nn.Module
    onnx_bytes: bytes
    manifest: Manifest
    report: QuantizationReport
    engine: Callable[[Tensor], Any] = field(repr=False)
    #: Validation inputs on which both forms agree: stored with the bundle, the int8 form is checked
    #: against the float weights on them at every load (:mod:`trainfer.serve.served_checks`).
    probes: Tensor = field(default_factory=lambda: torch.empty(0), repr=False)

    def __call__(self, batch: Tensor) -> Any:
        return self.engine(batch)

    def save(self, path: str | os.PathLike[str], **metadata: Any) -> Path:
        """Write the bundle (float deploy form + ``quantized.onnx`` + ``quantization.json``), atomically; a
        target that is not a bundle of trainfer's files alone is refused
        (:func:`trainfer.serve.bundle_write.check_replaceable`).

        ``metadata`` goes to :func:`trainfer.save` (e.g. ``factory=...`` for a model of your own).
        """
        from trainfer.serve.bundle_write import save_derived

        report = self.report.to_dict()
        return save_derived(
            self.float_model,
            path,
            self.manifest,
            finish=lambda staged: write_int8_form(staged, self.onnx_bytes, self.probes, report),
            **metadata,
        )


# --------------------------------------------------------------------------- calibration data
# --------------------------------------------------------------------------- sensitivity
# --------------------------------------------------------------------------- onnx runtime quantization
def _node_names(onnx_path: Path, layers: Iterable[str]) -> dict[str, str]:
    """Module name -> name of the ONNX node that reads ``<module>.weight``."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    by_weight = {node.input[1]: node.name for node in proto.graph.node if len(node.input) > 1}
    missing = [name for name in layers if f"{name}.weight" not in by_weight]
    if missing:
        raise RuntimeError(f"exported ONNX graph has no node reading the weights of {missing}")
    return {name: by_weight[f"{name}.weight"] for name in layers}


def _quantize_file(float_path: Path, out: Path, inputs: Tensor, exclude: list[str], settings: dict[str, Any]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(inputs.split(_CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.numpy()}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
    methods["percentile"] = CalibrationMethod.Percentile
    with _quiet():
        quantize_static(
            str(float_path),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=settings["reduce_range"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Gemm"],
            nodes_to_exclude=exclude,
            calibrate_method=methods[settings["calibration"]],
            extra_options=PLACEMENT[settings["runtime"]],
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger and prints histogram progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _with_manifest(path: Path, served: str) -> bytes:
    """The ONNX file at ``path`` carrying the manifest JSON ``served`` (:func:`_served_manifest`)."""
    import onnx

    from trainfer.serve.onnx_runtime import MANIFEST_KEY

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, served
    return proto.SerializeToString()


# --------------------------------------------------------------------------- quantize
def quantize(
    model_or_bundle: nn.Module | str | os.PathLike[str],
    calibration_data: Any,
    *,
    validation: Any = None,
    labels: Tensor | None = None,
    gate: AccuracyGate | None = None,
    equalize: bool | str = "auto",
    max_float_layers: int | None = None,
    calibration: str = "minmax",
    reduce_range: bool | None = None,
    calibration_limit: int | None = 512,
    sensitivity_samples: int = 128,
    threads: int | None = None,
    trust_factory: bool = False,
    runtime: str = "onnxruntime",
    reference: nn.Module | str | os.PathLike[str] | None = None,
) -> QuantizedModel:
    """The gated int8 form of ``model_or_bundle``; see the module docstring.

    ``validation`` (inputs, same forms as ``calibration_data``; default: the calibration inputs)
    and ``labels`` (class indices; 0/1 for a binary output; real targets for a regression output:
    :func:`~trainfer.serve.gate.gate_labels`) are what the gate measures on. ``equalize``: True,
    False, or ``"auto"`` (quantize both the equalized and the plain form, keep the one closer to
    the float form: with per-channel weights equalization does not always help). ``max_float_layers``:
    how many layers may fall back to float (default: half of them). ``reduce_range``: 7-bit
    weights (default: where the CPU lacks VNNI/AMX int8 dot products). ``trust_factory`` is
    :func:`trainfer.load`'s (for a bundle). ``runtime``: the runtime the file is made for, which
    places the quantizers (:data:`PLACEMENT`) and runs the gate (``"onnxruntime"`` or
    ``"openvino"``); a bundle serves its int8 form there by default. ``reference``: the model or bundle the
    gate compares with (default: ``model_or_bundle``'s float form), e.g. the original a pruned bundle was
    made from, so that the gate bounds the loss of both steps; it must take the same inputs and return
    outputs of the same shape. The probes a load checks are chosen against the float form either way.
    """
    check_type("model_or_bundle", model_or_bundle, nn.Module | str | os.PathLike, "an nn.Module or a bundle path")
    if calibration not in CALIBRATION_METHODS:
        raise InputError(f"calibration must be one of {list(CALIBRATION_METHODS)}; got {calibration!r}")
    if runtime not in PLACEMENT:
        raise InputError(f"runtime must be one of {list(PLACEMENT)}; got {runtime!r}")
    if equalize not in (True, False, "auto"):
        raise InputError(f"equalize must be True, False or 'auto'; got {equalize!r}")
    gate = gate or AccuracyGate()
    with tempfile.TemporaryDirectory(prefix="trainfer-quantize-") as work:
        workdir = Path(work)
        loaded = load_source(model_or_bundle, _example(model_or_bundle, calibration_data), trust_factory=trust_factory)
        check_class_gate(loaded.manifest, "trainfer.quantize")
        _check_one_output(loaded.manifest)
        output = gate_output(loaded.manifest)
        source = _Float(float32_copy(loaded.model), loaded.manifest)
        calib = calibration_inputs(calibration_data, source.manifest, calibration_limit)
        check = calibration_inputs(validation, source.manifest) if validation is not None else calib
        if validation is None:
            warn_gated_on_calibration(
                "quantize: no validation data", "Pass validation= (CLI: --validation) with held-out inputs"
            )
        float_outputs = logits_over(source.model, check)
        compared = (
            float_outputs if reference is None else _reference_outputs(reference, check, float_outputs, trust_factory)
        )
        labels = gate_labels(labels, output, tuple(compared.shape), gate)
        warn_small_gate(len(compared))
        settings = {
            "backend": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "weights": "int8 symmetric, per output channel",
            "activations": "uint8 asymmetric, per tensor",
            "calibration": calibration,
            "calibration_samples": len(calib),
            "reduce_range": not machine_info()["int8_dot_product"] if reduce_range is None else reduce_range,
            "runtime": runtime,
            "gate_reference": "the float form" if reference is None else "another form (reference=)",
        }
        search = _Search(source, calib, (check, labels, compared), (gate, output), settings, workdir, float_outputs)
        search.threads = threads or torch.get_num_threads()
        options = (False, True) if equalize == "auto" else (bool(equalize),)
        variants = [search.prepare(option, sensitivity_samples) for option in options]
        return search.run(variants, max_float_layers)


def _reference_outputs(reference: Any, inputs: Tensor, float_outputs: Tensor, trust_factory: bool) -> Tensor:
    """The outputs of ``quantize``'s ``reference=`` (a model or bundle, loaded as the source is) over ``inputs``."""
    check_type("reference", reference, nn.Module | str | os.PathLike, "an nn.Module or a bundle path")
    model = float32_copy(load_source(reference, inputs[:2], trust_factory=trust_factory).model)
    outputs = logits_over(model, inputs)
    if outputs.shape != float_outputs.shape:
        raise InputError(
            f"reference= returns outputs of shape {tuple(outputs.shape)} on the validation inputs; the model "
            f"quantized returns {tuple(float_outputs.shape)}: give the form this model was made from"
        )
    return outputs


def _check_one_output(manifest: Manifest) -> None:
    """Refuse (:class:`InputError`) a model that returns a tuple or dict (several heads, or one output
    picked from several): the sensitivity search and the gate compare one output tensor."""
    structure = manifest.output_structure
    if structure is not None and structure.type != "tensor":
        raise InputError(
            f"trainfer.quantize supports models that return one tensor; this one returns a {structure.type}: "
            "serve it in float32 (trainfer deploy)"
        )


def _example(model_or_bundle: Any, calibration_data: Any) -> Tensor | None:
    """Two calibration samples as the example batch of a model (a bundle knows its input shape)."""
    if isinstance(model_or_bundle, nn.Module) and isinstance(calibration_data, Tensor | np.ndarray):
        return torch.as_tensor(calibration_data[:2]).float()
    return None


@dataclass(frozen=True)
class _Float:
    """The float32 deploy form to quantize and its manifest."""

    model: nn.Module
    manifest: Manifest


@dataclass
class _Variant:
    """One float form to quantize (equalized or not), its ONNX export and its sensitivity ranking."""

    model: nn.Module
    float_path: Path
    nodes: dict[str, str]
    ranking: list[LayerSensitivity]
    equalization: str | None


@dataclass
class _Search:
    """Quantize, gate, and fall back to float layer by layer (most sensitive first) until the gate passes."""

    source: _Float
    calib: Tensor
    check: tuple[Tensor, Tensor | None, Tensor]
    gate: tuple[AccuracyGate, GateOutput]
    settings: dict[str, Any]
    workdir: Path
    #: The float form's outputs on the gate's inputs, which the probes are chosen against (the gate's
    #: ``check`` reference may be another form: ``quantize(reference=...)``).
    float_outputs: Tensor
    threads: int = 1
    attempts: list[str] = field(default_factory=list)

    def prepare(self, equalized: bool, samples: int) -> _Variant:
        from trainfer.serve.export import export

        model, equalization = self.source.model, None
        if equalized:
            from trainfer.reparam.equalize import equalize

            model, report = equalize(model, self.calib[:8])
            equalization = str(report)
        path = self.workdir / f"float_{int(equalized)}.onnx"
        export(model, path, "onnx", example_inputs=self.calib[:2])
        ranking = sensitivity(model, self.calib[:samples], 7 if self.settings["reduce_range"] else 8)
        return _Variant(model, path, _node_names(path, [layer.name for layer in ranking]), ranking, equalization)

    def attempt(self, variant: _Variant, count: int) -> tuple[GateReport, Any, Path]:
        """Quantize ``variant`` with its ``count`` most sensitive layers kept in float, and gate it."""
        inputs, labels, reference = self.check
        kept = [layer.name for layer in variant.ranking[:count]]
        out = self.workdir / f"int8_{len(self.attempts)}.onnx"
        _quantize_file(variant.float_path, out, self.calib, [variant.nodes[name] for name in kept], self.settings)
        engine = int8_engine(self.settings["runtime"], out, self.source.manifest, self.threads, out.read_bytes())
        report = gate_report(reference, logits_over(engine, inputs), labels, *self.gate)
        form = "equalized" if variant.equalization else "plain"
        self.attempts.append(f"{form}, {count} layer(s) in float: {report}")
        return report, engine, out

    def run(self, variants: list[_Variant], max_float_layers: int | None) -> QuantizedModel:
        tried = [(variant, *self.attempt(variant, 0)) for variant in variants]
        variant, report, engine, out = max(tried, key=lambda t: (t[1].ok, -t[1].damage, -t[1].max_rel_error))
        limit = min(len(variant.ranking) // 2 if max_float_layers is None else max_float_layers, len(variant.ranking))
        count = 0
        while not report.ok and count < limit:
            count += 1
            report, engine, out = self.attempt(variant, count)
        kept = [layer.name for layer in variant.ranking[:count]]
        settings = {**self.settings, "equalized": variant.equalization is not None}
        result = QuantizationReport(report, variant.ranking, kept, self.attempts, settings, variant.equalization)
        if not report.ok:
            raise QuantizationError(
                f"no int8 form passes the gate with at most {limit} of {len(variant.ranking)} layers in float; "
                f"last tried: {report}. Give more or more representative calibration data, allow more float "
                f"layers (max_float_layers) or a looser gate",
                result,
            )
        data = _with_manifest(out, _served_manifest(self.source.manifest))
        inputs = self.check[0]
        try:  # what a bundle's load checks the int8 form on (trainfer.serve.served_checks)
            probes = select_probes(inputs, self.float_outputs, logits_over(engine, inputs))
        except ValueError as error:
            raise QuantizationError(
                f"{error}: the gate passed, but nothing could check this int8 form", result
            ) from None
        if not len(probes):  # a bundle without probes is refused by every load: never write one
            raise QuantizationError(
                f"the int8 form agrees with the float form on none of the {len(inputs)} validation inputs (the same "
                f"class, or for one-column outputs an error within {MAX_INT8_REL_ERROR} of the output scale: what "
                "every load checks), so no load would accept it: give more representative calibration data, "
                "allow more float layers (max_float_layers) or a stricter gate",
                result,
            )
        return QuantizedModel(variant.model, data, self.source.manifest, result, engine, probes)


def _served_manifest(manifest: Manifest) -> str:
    """The manifest JSON inside ``quantized.onnx``: the float form's, without weights, marked as the QDQ int8 form."""
    served = manifest.model_copy(update={"form": "deploy", "weights": None}).to_json()
    return json.dumps({**served, "quantized": {"format": "QDQ", "weights": "int8"}})
