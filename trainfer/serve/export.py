"""Export the deploy form of a model to ONNX, TorchScript or a torch.export ExportedProgram, checked.

``export(bundle_or_model, path, format)`` deploys a training-form model first
(:func:`trainfer.deploy`, verified), exports it with a dynamic batch dimension, runs the exported
file against PyTorch on random inputs of two batch sizes (ONNX through onnxruntime) and returns
the maximum errors in an :class:`ExportReport`; a file whose relative error exceeds ``rtol`` (default:
the dtype's row of :data:`trainfer.numerics.TOLERANCE`) is never written
(:class:`trainfer.EquivalenceError`).

The bundle manifest travels inside the exported file, as JSON under the key ``trainfer.manifest``:
in the ONNX model's ``metadata_props``, in TorchScript's ``_extra_files`` and in the
ExportedProgram's ``extra_files``. :mod:`trainfer.serve.onnx_runtime` reads it back so
``Predictor.load("model.onnx")`` serves with the same preprocessing, labels and output kinds.

ONNX export uses PyTorch's TorchScript-based exporter (``dynamo=False``): for the plain conv/linear
graphs of deploy forms it is the faster and more predictable of the two. onnx and onnxruntime are
the optional extra ``trainfer[onnx]``, imported on use.

Threads: ``export`` may be called from several threads at once. torch's exporters keep
process-global state (the ONNX exporter's ``GLOBALS.in_onnx_export`` flag), so the export itself
and the loading of the exported file run one at a time, under one lock of this module; the
comparison against PyTorch runs in parallel.
"""

from __future__ import annotations

import copy
import io
import json
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.atomic import atomic_file
from trainfer.errors import EquivalenceError, InputError
from trainfer.extras import require
from trainfer.numerics import tolerance_for
from trainfer.serve.export_formats import FORMATS
from trainfer.serve.onnx_runtime import MANIFEST_KEY, OnnxModel, read_onnx_manifest
from trainfer.serve.outputs import flatten_outputs
from trainfer.serve.source import load_source
from trainfer.validate import check_tolerance

ONNX_OPSET = 17
_CHECK_BATCHES = (1, 3)
#: torch's exporters keep process-global state (the ONNX exporter's ``GLOBALS.in_onnx_export``,
#: torch.export's tracing state, the warning filters set around them): one export at a time.
_EXPORT_LOCK = threading.Lock()

__all__ = ["FORMATS", "ExportReport", "export"]


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
    rtol: float | None = None,
    trust_factory: bool = False,
) -> ExportReport:
    """Export the deploy form of a bundle (or model) to ``path``; see the module docstring.

    ``example_inputs`` fixes the sample shape (default: random inputs of the manifest's shape);
    ``rtol`` bounds the max error relative to each output's scale; ``trust_factory`` is
    :func:`trainfer.load`'s.
    """
    from trainfer.serve.manifest import Exported

    if format not in FORMATS:
        raise InputError(f"format must be one of {list(FORMATS)}; got {format!r}")
    rtol = check_tolerance("rtol", rtol)
    source = load_source(bundle_or_model, example_inputs, trust_factory=trust_factory)
    example, deployed_here = source.example, source.deployed_here
    shape, dtype = (1, *source.sample_shape), example.dtype
    model = copy.deepcopy(source.model).eval().to("cpu")
    exported = Exported(format=format, deployed_here=deployed_here)
    manifest = source.manifest.model_copy(update={"weights": None, "exported": exported})
    with torch.no_grad():
        names, _ = flatten_outputs(model(example))
    limit = rtol if rtol is not None else tolerance_for(dtype)
    with atomic_file(path) as tmp:
        with _EXPORT_LOCK:  # also around loading: warnings.catch_warnings is process-global too
            _EXPORTERS[format](model, example, names, json.dumps(manifest.to_json()), tmp)
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


# --------------------------------------------------------------------------- exporters
def _export_onnx(model: nn.Module, example: Tensor, names: list[str], manifest: str, path: Path) -> None:
    onnx = require("onnx", "onnx", "ONNX export")
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in ["input", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, on purpose
        torch.onnx.export(
            model,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects; stub: paths only
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
    return OnnxModel(path, read_onnx_manifest(path))


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
