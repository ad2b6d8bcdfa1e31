"""Export the deploy form of a model to ONNX, TorchScript or a torch.export ExportedProgram, checked.

``export(bundle_or_model, path, format)`` deploys a training-form model first
(:func:`trainfer.deploy`, verified), exports it with a dynamic batch dimension, runs the exported
file against PyTorch on random inputs of two batch sizes (ONNX through onnxruntime) and returns
the maximum errors in an :class:`ExportReport`; a file that disagrees beyond ``tolerance`` is never
written (:class:`trainfer.EquivalenceError`).

The bundle manifest travels inside the exported file, as JSON under the key ``trainfer.manifest``:
in the ONNX model's ``metadata_props``, in TorchScript's ``_extra_files`` and in the
ExportedProgram's ``extra_files``. :func:`load_onnx` reads it back so
``Predictor.load("model.onnx")`` serves with the same preprocessing, labels and output kinds.

ONNX export uses PyTorch's TorchScript-based exporter (``dynamo=False``): for the plain conv/linear
graphs of deploy forms it is the faster and more predictable of the two. onnx and onnxruntime are
the optional extra ``trainfer[onnx]`` and are imported only here, on use.
"""

from __future__ import annotations

import collections
import copy
import importlib
import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.atomic import atomic_file
from trainfer.errors import BundleError, EquivalenceError, InputError, MissingExtraError
from trainfer.numerics import tolerance_for
from trainfer.serve.bundle import build_manifest, check_manifest, load, read_manifest
from trainfer.serve.outputs import flatten_outputs

FORMATS = ("onnx", "torchscript", "exported-program")
MANIFEST_KEY = "trainfer.manifest"
ONNX_OPSET = 17
ONNX_EXTRA = "pip install 'trainfer[onnx]'"
_CHECK_BATCHES = (1, 3)

__all__ = ["FORMATS", "ExportReport", "export", "load_onnx", "read_exported_manifest"]


@dataclass(frozen=True)
class ExportReport:
    """Where the export went and how closely it reproduces PyTorch on random inputs."""

    path: Path
    format: str
    form: str
    deployed_here: bool
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...]
    checked_batch_sizes: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float

    def __str__(self) -> str:
        deployed = " (deployed from the training form first)" if self.deployed_here else ""
        return (
            f"exported the {self.form} form{deployed} as {self.format} to {self.path}\n"
            f"input (N, {', '.join(map(str, self.input_shape[1:]))}) with a dynamic batch dimension; "
            f"outputs {list(self.outputs)}\n"
            f"checked against PyTorch at batch sizes {list(self.checked_batch_sizes)}: "
            f"max abs error {self.max_abs_error:.3e}, max rel error {self.max_rel_error:.3e}"
        )


def export(
    bundle_or_model: str | os.PathLike[str] | nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    example_inputs: Tensor | None = None,
    *,
    tolerance: float | None = None,
    trust_factory: bool = False,
) -> ExportReport:
    """Export the deploy form of a bundle (or model) to ``path``; see the module docstring.

    ``example_inputs`` fixes the sample shape (default: random inputs of the manifest's shape);
    ``trust_factory`` is :func:`trainfer.load`'s.
    """
    if format not in FORMATS:
        raise InputError(f"format must be one of {list(FORMATS)}; got {format!r}")
    model, manifest = _source(bundle_or_model, example_inputs, trust_factory)
    shape = _input_shape(manifest, example_inputs)
    dtype = getattr(torch, manifest["input"].get("dtype") or "float32")
    example = example_inputs.to(dtype) if example_inputs is not None else torch.randn(2, *shape[1:], dtype=dtype)
    deployed_here = manifest["form"] == "train"
    if deployed_here:
        from trainfer.reparam.deploy import deploy

        model = deploy(model, example)
    model = copy.deepcopy(model).eval().to("cpu")
    manifest = {**manifest, "form": "deploy", "exported": {"format": format, "deployed_here": deployed_here}}
    manifest.pop("weights", None)
    with torch.no_grad():
        names, _ = flatten_outputs(model(example))
    limit = tolerance if tolerance is not None else tolerance_for(dtype)
    with atomic_file(path) as tmp:
        _EXPORTERS[format](model, example, names, json.dumps(manifest), tmp)
        run = _RUNNERS[format](tmp)
        abs_error, rel_error = _compare(model, run, shape, dtype)
        if rel_error > limit:
            raise EquivalenceError(
                f"the exported {format} model differs from PyTorch: max rel error {rel_error:.3e} > {limit:.0e} "
                f"(max abs error {abs_error:.3e}); nothing was written to {str(path)!r}"
            )
    return ExportReport(
        Path(path), format, "deploy", deployed_here, shape, tuple(names), _CHECK_BATCHES, abs_error, rel_error
    )


def _source(bundle_or_model: Any, example_inputs: Tensor | None, trust: bool) -> tuple[nn.Module, dict[str, Any]]:
    if isinstance(bundle_or_model, nn.Module):
        return bundle_or_model, build_manifest(bundle_or_model, example_inputs=example_inputs)
    return load(bundle_or_model, trust_factory=trust), read_manifest(bundle_or_model)


def _input_shape(manifest: dict[str, Any], example_inputs: Tensor | None) -> tuple[int, ...]:
    if example_inputs is not None:
        return (1, *example_inputs.shape[1:])
    shape = manifest["input"].get("shape")
    if not shape:
        raise InputError("export needs the input shape: pass example_inputs (a batch of the model's inputs)")
    return tuple(shape)


# --------------------------------------------------------------------------- exporters
def _export_onnx(model: nn.Module, example: Tensor, names: list[str], manifest: str, path: Path) -> None:
    onnx = _require("onnx")
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in ["input", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, on purpose
        torch.onnx.export(
            model,
            (example,),
            buffer,
            input_names=["input"],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, manifest
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, example: Tensor, names: list[str], manifest: str, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still asked for
        traced = torch.jit.trace(model, (example,), strict=False)
        torch.jit.save(traced, str(path), _extra_files={MANIFEST_KEY: manifest})


def _export_program(model: nn.Module, example: Tensor, names: list[str], manifest: str, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path), extra_files={MANIFEST_KEY: manifest})


_EXPORTERS: dict[str, Callable[[nn.Module, Tensor, list[str], str, Path], None]] = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "exported-program": _export_program,
}


# --------------------------------------------------------------------------- runners and checks
def _run_torchscript(path: Path) -> Callable[[Tensor], Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _run_program(path: Path) -> Callable[[Tensor], Any]:
    return torch.export.load(str(path)).module()


def _run_onnx(path: Path) -> Callable[[Tensor], Any]:
    return OnnxModel(path, _onnx_manifest(path))


_RUNNERS: dict[str, Callable[[Path], Callable[[Tensor], Any]]] = {
    "onnx": _run_onnx,
    "torchscript": _run_torchscript,
    "exported-program": _run_program,
}


def _compare(
    model: nn.Module, run: Callable[[Tensor], Any], shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[float, float]:
    """Max abs and rel error (relative to each output's scale) over random batches of several sizes."""
    generator = torch.Generator().manual_seed(0)
    abs_error = rel_error = 0.0
    for batch in _CHECK_BATCHES:
        x = torch.randn(batch, *shape[1:], generator=generator, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            _, expected = flatten_outputs(model(x))
            _, got = flatten_outputs(run(x))
        for reference, candidate in zip(expected, got, strict=True):
            if tuple(candidate.shape) != tuple(reference.shape):
                raise EquivalenceError(
                    f"exported output shape {tuple(candidate.shape)} != PyTorch's {tuple(reference.shape)} "
                    f"at batch {batch}"
                )
            difference = float((candidate.double() - reference.double()).abs().max())
            scale = float(reference.double().abs().max()) or 1.0
            abs_error, rel_error = max(abs_error, difference), max(rel_error, difference / scale)
    return abs_error, rel_error


# --------------------------------------------------------------------------- ONNX serving
class OnnxModel:
    """An ONNX Runtime session that takes a batch tensor and returns the model's output structure."""

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any], session_options: Any = None):
        """``session_options``: an ``onnxruntime.SessionOptions`` (threads, optimisation level), or None."""
        ort = _require("onnxruntime")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.dtype = manifest["input"].get("dtype") or "float32"
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as error:  # onnxruntime raises its own pybind exception types
            hint = " (onnxruntime has few float64 kernels: export a float32 copy, model.float())"
            raise InputError(
                f"onnxruntime cannot run {str(path)!r}: {error}{hint if self.dtype == 'float64' else ''}"
            ) from None
        self.manifest = manifest
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, batch: Tensor) -> Any:
        array = batch.detach().to("cpu", getattr(torch, self.dtype)).contiguous().numpy()
        values = [torch.from_numpy(v) for v in self.session.run(self.output_names, {self.input_name: array})]
        return structured(values, self.output_names, self.manifest)


def structured(values: list[Tensor], names: list[str], manifest: dict[str, Any]) -> Any:
    """Flat output ``values`` (named ``names``) in the output structure the manifest records."""
    structure = manifest.get("output_structure") or {"type": "tensor"}
    if structure["type"] == "tensor":
        return values[0]
    if structure["type"] == "dict":
        return dict(zip(names, values, strict=True))
    if structure.get("fields"):  # a named tuple: rebuilt so that output="field" still selects
        return collections.namedtuple("Outputs", structure["fields"])(*values)
    return tuple(values)


def load_onnx(path: str | os.PathLike[str]) -> tuple[OnnxModel, dict[str, Any]]:
    """An :class:`OnnxModel` for an exported file and the manifest stored inside it."""
    manifest = _onnx_manifest(Path(path))
    return OnnxModel(path, manifest), manifest


def _onnx_manifest(path: Path) -> dict[str, Any]:
    onnx = _require("onnx")
    if not path.is_file():
        raise BundleError(f"ONNX file not found: {str(path)!r}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends from protobuf
        raise BundleError(f"cannot read ONNX model {str(path)!r}: {error}") from None
    return _parse_manifest({p.key: p.value for p in proto.metadata_props}.get(MANIFEST_KEY), path)


def read_exported_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest inside an exported ``.onnx``, TorchScript or ExportedProgram file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return _onnx_manifest(path)
    extra = {MANIFEST_KEY: ""}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=extra)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return _parse_manifest(extra[MANIFEST_KEY] or None, path)


def _parse_manifest(text: str | bytes | None, path: Path) -> dict[str, Any]:
    if not text:
        raise BundleError(f"{str(path)!r} carries no trainfer manifest: export it with trainfer.export")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise BundleError(f"the trainfer manifest inside {str(path)!r} is not valid JSON: {error}") from None
    return check_manifest(data, f"inside {str(path)!r}", bundle=False)


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingExtraError(
            f"{name} is needed for ONNX export and serving: {ONNX_EXTRA} (optional extra 'onnx')"
        ) from error
