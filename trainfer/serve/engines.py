"""The engines a deploy form is served by: eager/inductor PyTorch, ONNX Runtime, OpenVINO.

Each engine is a callable ``batch -> output`` (float32 outputs, the model's output structure).
:class:`CompiledModel` is an engine with the :class:`~trainfer.serve.runtime_record.RuntimeRecord` saying
what serves it and why (see :func:`trainfer.serve.runtime.compile`).
"""

from __future__ import annotations

import copy
import importlib
import queue
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from trainfer.errors import InputError
from trainfer.extras import require
from trainfer.recipe import ModelRecipe, attach_recipe
from trainfer.serve.runtime_record import RuntimeRecord

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = [
    "DTYPES",
    "CompiledModel",
    "OpenVinoEngine",
    "TorchEngine",
    "int8_engine",
    "openvino_precisions",
    "ort_engine",
]


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


def ort_engine(path: Path, manifest: Manifest, threads: int, data: bytes | None = None) -> Callable[[Tensor], Any]:
    """An ONNX Runtime session on ``path`` (all graph optimisations, ``threads`` intra-op threads that
    sleep when idle: by default they spin for a while after each run, taking the cores from whatever
    runs next -- the next form of a paired measurement, a server's event loop). ``data``: the file's
    bytes, already read and checked, which the session is built from (see :class:`OnnxModel`)."""
    ort = require("onnxruntime", "onnx", "the onnxruntime runtime")
    from trainfer.serve.onnx_runtime import OnnxModel

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return OnnxModel(path, manifest, options, dtype="float32", data=data)


def int8_engine(runtime: str, path: Path, manifest: Manifest, threads: int, data: bytes) -> Callable[[Tensor], Any]:
    """The engine of ``runtime`` (``onnxruntime`` or ``openvino``) on the QDQ model ``data``, the bytes
    of the file at ``path`` (named in errors) as the caller read and checked them: the file is never
    opened again, so a file put in its place after the check is never run."""
    if runtime == "onnxruntime":
        return ort_engine(path, manifest, threads, data)
    return OpenVinoEngine(path, manifest, threads, data=data)


class OpenVinoEngine:
    """An OpenVINO CPU compilation of an ONNX file at ``precision`` (``f32``, ``bf16``, ``f16``); of
    ``data``, the file's bytes already read and checked, when given (read by OpenVINO's ONNX reader from
    memory: ``path`` then only names it in errors, and is never opened).

    Safe to call from any number of threads: an OpenVINO infer request serves one inference at a
    time (a second concurrent ``infer`` raises "Infer Request is busy" or overwrites the first's
    outputs), so each call takes a request of its own from a pool, created on demand, copies its
    outputs and puts the request back. The compiled model itself is shared (OpenVINO allows that).
    """

    def __init__(self, path: Path, manifest: Manifest, threads: int, dtype: str = "float32", data: bytes | None = None):
        ov = require("openvino", "openvino", "the openvino runtime")
        core = ov.Core()
        hint = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[dtype]
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        try:
            model = str(path) if data is None else _onnx_from_memory(data)
            self.compiled = core.compile_model(model, "CPU", config)
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


def _onnx_from_memory(data: bytes) -> Any:
    """An OpenVINO model of the ONNX model ``data``, read by OpenVINO's ONNX reader alone (``Core.read_model``
    on bytes would also take OpenVINO's own XML and other formats)."""
    import io

    from openvino.frontend import FrontEndManager

    reader = FrontEndManager().load_by_framework("onnx")
    return reader.convert(reader.load(io.BytesIO(data)))


def openvino_precisions() -> tuple[str, ...]:
    """The dtypes OpenVINO's CPU plugin computes in on this machine (empty if OpenVINO is missing)."""
    try:
        ov = importlib.import_module("openvino")
    except ImportError:
        return ()
    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    names = {"FP32": "float32", "BF16": "bfloat16", "FP16": "float16"}
    return tuple(name for key, name in names.items() if key in capabilities)


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
