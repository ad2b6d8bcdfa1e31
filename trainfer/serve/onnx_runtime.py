"""Serve an exported ONNX file: an ONNX Runtime session behind the model call convention, and the
trainfer manifest that travels inside exported files.

The exporter (:mod:`trainfer.serve.export`) writes the manifest as JSON under :data:`MANIFEST_KEY`:
in the ONNX model's ``metadata_props``, in TorchScript's ``_extra_files`` and in the ExportedProgram's
``extra_files``. This module only reads: serving (``Predictor.load("model.onnx")``) needs it and never
the exporter. Every manifest read here passes the same schema check as a bundle's
(:func:`trainfer.serve.bundle_format.check_manifest`). onnx and onnxruntime are the optional extra
``trainfer[onnx]``, imported on use.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trainfer.errors import BundleError, InputError
from trainfer.extras import require
from trainfer.jsonfile import parse_json
from trainfer.serve.bundle_format import check_manifest

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

MANIFEST_KEY = "trainfer.manifest"

__all__ = ["MANIFEST_KEY", "OnnxModel", "load_onnx", "read_exported_manifest", "read_onnx_manifest", "structured"]


class OnnxModel:
    """An ONNX Runtime session that takes a batch tensor and returns the model's output structure."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest,
        session_options: Any = None,
        dtype: str | None = None,
        data: bytes | None = None,
    ):
        """``session_options``: an ``onnxruntime.SessionOptions`` (threads, optimisation level), or None;
        ``dtype``: the input dtype the file takes (default: the manifest's); ``data``: the file's bytes,
        already read and checked, which the session is built from (``path`` then only names it in
        messages, and is never opened: a file put in its place after the check is never run)."""
        ort = require("onnxruntime", "onnx", "serving an ONNX file")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.dtype = dtype or manifest.input.dtype or "float32"
        try:
            model = str(path) if data is None else data
            self.session = ort.InferenceSession(model, session_options, providers=providers)
        except Exception as error:  # onnxruntime raises its own pybind exception types
            hint = " (onnxruntime has few float64 kernels: export a float32 copy, model.float())"
            raise InputError(
                f"onnxruntime cannot run {str(path)!r}: {error}{hint if self.dtype == 'float64' else ''}"
            ) from None
        self.manifest, self.path = manifest, str(path)
        self.errors = _ort_errors(ort)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, batch: Tensor) -> Any:
        array = batch.detach().to("cpu", getattr(torch, self.dtype)).contiguous().numpy()
        try:
            outputs = self.session.run(self.output_names, {self.input_name: array})
        except self.errors as error:  # e.g. an allocation the machine cannot make, a shape the graph refuses
            message = " ".join(str(error).split())[:500]
            shape = tuple(array.shape)
            raise InputError(f"onnxruntime failed running {self.path!r} on a batch of {shape}: {message}") from None
        values = [torch.from_numpy(v) for v in outputs]
        return structured(values, self.output_names, self.manifest)


def _ort_errors(ort: Any) -> tuple[type[Exception], ...]:
    """The exception types onnxruntime raises from a run (its pybind classes), and MemoryError."""
    state = ort.capi.onnxruntime_pybind11_state
    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (*found, MemoryError)


def structured(values: list[Tensor], names: list[str], manifest: Manifest) -> Any:
    """Flat output ``values`` (named ``names``) in the output structure the manifest records."""
    structure = manifest.output_structure
    if structure is None or structure.type == "tensor":
        return values[0]
    if structure.type == "dict":
        return dict(zip(names, values, strict=True))
    if structure.fields:  # a named tuple: rebuilt so that output="field" still selects
        return collections.namedtuple("Outputs", structure.fields)(*values)
    return tuple(values)


def load_onnx(path: str | os.PathLike[str]) -> tuple[OnnxModel, Manifest]:
    """An :class:`OnnxModel` for an exported file and the manifest stored inside it."""
    manifest = read_onnx_manifest(Path(path))
    return OnnxModel(path, manifest), manifest


def read_onnx_manifest(path: Path) -> Manifest:
    """The manifest stored in an ONNX file's ``metadata_props`` (schema-checked)."""
    onnx = require("onnx", "onnx", "reading an ONNX file")
    if not path.is_file():
        raise BundleError(f"ONNX file not found: {str(path)!r}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends from protobuf
        raise BundleError(f"cannot read ONNX model {str(path)!r}: {error}") from None
    return _parse_manifest({p.key: p.value for p in proto.metadata_props}.get(MANIFEST_KEY), path)


def read_exported_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest inside an exported ``.onnx``, TorchScript or ExportedProgram file."""
    path = Path(path)
    if path.suffix == ".onnx":
        return read_onnx_manifest(path)
    extra = {MANIFEST_KEY: ""}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=extra)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return _parse_manifest(extra[MANIFEST_KEY] or None, path)


def _parse_manifest(text: str | bytes | None, path: Path) -> Manifest:
    if not text:
        raise BundleError(f"{str(path)!r} carries no trainfer manifest: export it with trainfer.export")
    data = parse_json(text, f"the trainfer manifest inside {str(path)!r}", error=BundleError)
    return check_manifest(data, f"inside {str(path)!r}", bundle=False)
