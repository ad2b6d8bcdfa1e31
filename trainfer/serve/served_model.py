"""What ``Predictor.load`` serves for a path: the one place that decides ONNX file, int8 form, recorded
runtime or the bundle's PyTorch model (:class:`~trainfer.Predictor` then only serves it).

* an ``.onnx`` file: an ONNX Runtime session (:class:`~trainfer.serve.onnx_runtime.OnnxModel`) and the
  manifest stored inside it;
* a bundle with a ``runtime.json`` (``trainfer compile``) and no ``runtime`` named: what it records,
  as ``runtime="recorded"`` serves it, so that a default load serves what ``trainfer serve`` serves
  (``device="auto"`` too, where CUDA is available); naming another ``device`` without a ``runtime``
  (records and int8 forms run on the CPU) serves the bundle's PyTorch model there;
* a bundle carrying an int8 form (``trainfer quantize``) and no ``runtime.json``: that form, checked
  against the float weights (:func:`trainfer.serve.int8_form.serve_quantized`), unless ``runtime``
  names a PyTorch runtime;
* ``runtime=`` a :class:`~trainfer.serve.engines.CompiledModel` (what :func:`trainfer.compile` returned for
  this bundle, e.g. ``trainfer serve --compile``'s search): that form, as it is;
* ``runtime="recorded"``: the bundle's :class:`~trainfer.serve.runtime_record.RuntimeRecord` (an int8
  record: the int8 form, on the runtime it records);
* otherwise the bundle's model (:func:`trainfer.load`), moved to its device and put in eval for good.

The manifest supplies the heads, preprocessing and decoder settings; the caller's ``overrides`` win.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from trainfer.readfile import present
from trainfer.serve.devices import pick_device
from trainfer.serve.outputs import Head
from trainfer.serve.runtime_record import RUNTIME_FILE, TORCH_RUNTIMES

__all__ = ["PYTORCH_MODEL", "Served", "load_origin", "open_served", "served_form", "serving_words"]

#: What :func:`serving_words` calls the bundle's own PyTorch model.
PYTORCH_MODEL = "torch, the bundle's PyTorch model"


@dataclass(frozen=True)
class Served:
    """The model to serve, the heads and preprocessing its manifest records, and the settings left to apply."""

    model: Callable[[Tensor], Any]
    heads: list[Head]
    preprocess: dict[str, Any] | None
    overrides: dict[str, Any]


def open_served(
    path: Path,
    overrides: dict[str, Any],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: bool = False,
    float_form: bool = False,
) -> Served:
    """What serves the ``.onnx`` file or bundle at ``path`` (see the module docstring).

    ``factory`` and ``trust_factory`` are :func:`trainfer.load`'s (also for the float form an int8 form is
    checked against). ``float_form``: the bundle's float PyTorch model whatever it records or carries
    (``runtime.json``, an int8 form, a ``runtime`` override): what explanations differentiate.
    """
    model: Callable[[Tensor], Any]
    if path.suffix == ".onnx":
        from trainfer.serve.onnx_runtime import load_onnx

        model, manifest = load_onnx(path)
    else:
        from trainfer.serve.bundle import load
        from trainfer.serve.bundle_format import read_manifest

        manifest = read_manifest(path)
        _refuse_stray_record(path, manifest.decoder)
        if float_form:
            engine, overrides = None, _without_runtime(overrides)
        else:
            engine, overrides = _engine(path, overrides, factory=factory, trust_factory=trust_factory)
        if engine is None:  # ours: moved, not copied, and put in eval for good (calls then never switch modes)
            module = load(path, factory=factory, trust_factory=trust_factory)
            engine = module.to(pick_device(overrides.get("device", "auto"))).eval()
        model = engine
    if manifest.decoder is not None:
        overrides = {"decoder": manifest.decoder.model_dump(), **overrides}
    heads = [Head.from_dict(head) for head in manifest.head_settings()]
    return Served(model, heads, manifest.preprocess_settings(), overrides)


def _refuse_stray_record(bundle: Path, decoder: Any) -> None:
    """Refuse a ``runtime.json`` in an autoregressive sequence bundle: no runtime applies to one (its
    decoding calls encode() and step() per token) and ``trainfer compile`` refuses it, so none recorded it."""
    from trainfer.errors import BundleError
    from trainfer.serve.sequence import is_autoregressive

    if decoder is not None and is_autoregressive(decoder.model_dump()) and present(bundle / RUNTIME_FILE):
        raise BundleError(
            f"bundle {str(bundle)!r} holds a {RUNTIME_FILE}, but no runtime applies to an autoregressive sequence "
            f"model (trainfer compile never records one for it): remove {RUNTIME_FILE}"
        )


def _engine(
    bundle: str | os.PathLike[str], overrides: dict[str, Any], **load_options: Any
) -> tuple[Callable[[Tensor], Any] | None, dict[str, Any]]:
    """The int8 form or recorded runtime a bundle serves (or ``None``: its PyTorch model serves), and
    the overrides left (see the module docstring)."""
    from trainfer.serve.engines import CompiledModel
    from trainfer.serve.int8_form import QUANTIZATION_FILE, serve_quantized
    from trainfer.serve.runtime import recorded_runtime

    elsewhere = _names_another_device(overrides)  # checked whatever serves: an unavailable device is refused
    runtime = overrides.get("runtime")
    if isinstance(runtime, CompiledModel):  # compiled (verified, gated) for this bundle by the caller
        return runtime, _without_runtime(overrides)
    recorded = present(Path(bundle) / RUNTIME_FILE)  # a FIFO, a directory, a dangling link: BundleError
    if runtime is None and elsewhere:  # recorded runtimes and int8 forms run on the CPU
        return None, overrides
    if runtime is None and recorded:
        runtime = "recorded"
    if runtime == "recorded" and recorded:
        record = recorded_runtime(bundle)
        if record.dtype == "int8":
            return serve_quantized(bundle, record.runtime, **load_options), _without_runtime(overrides)
        return None, {**overrides, "runtime": record}
    if present(Path(bundle) / QUANTIZATION_FILE) and runtime not in TORCH_RUNTIMES:
        chosen = None if runtime in (None, "auto", "recorded") else runtime
        return serve_quantized(bundle, chosen, **load_options), _without_runtime(overrides)
    if runtime == "recorded":
        return None, {**overrides, "runtime": recorded_runtime(bundle)}  # refused: the bundle records none
    return None, overrides


def _without_runtime(overrides: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in overrides.items() if key != "runtime"}


def _names_another_device(overrides: dict[str, Any]) -> bool:
    """Whether the load names a ``device`` other than the CPU (``"auto"``, the default, names none: a default
    load serves what ``trainfer serve`` serves even where CUDA is available); an unavailable one is refused."""
    name = overrides.get("device", "auto")
    return pick_device(name).type != "cpu" and name != "auto"


def served_form(model: Any) -> str | None:
    """``"<runtime>/<dtype>"`` when ``model`` is a compiled or int8 form (it carries a runtime ``record``),
    else ``None``: the bundle's PyTorch model (or an ``.onnx`` file's session) serves."""
    record = getattr(model, "record", None)
    return f"{record.runtime}/{record.dtype}" if record is not None else None


def serving_words(model: Any, origin: str) -> str:
    """What serves, in the words of ``trainfer serve``'s ready line and ``trainfer predict``'s note:
    ``"<runtime>/<dtype>, <origin>"`` (e.g. ``"onnxruntime/int8, recorded in runtime.json"``), or
    :data:`PYTORCH_MODEL`. ``origin``: why that form serves (:func:`load_origin`; ``""``: nothing to say)."""
    form = served_form(model)
    if form is None:
        return PYTORCH_MODEL
    return f"{form}, {origin}" if origin else form


def load_origin(path: str | os.PathLike[str], runtime: Any) -> str:
    """Why a load of the bundle at ``path`` with ``runtime`` (``None``: a default load) serves the form it
    serves, for :func:`serving_words`: the runtime asked for, or the bundle's ``runtime.json``."""
    if runtime is not None:
        return f"runtime {runtime!r} asked for"
    return f"recorded in {RUNTIME_FILE}" if (Path(path) / RUNTIME_FILE).is_file() else ""
