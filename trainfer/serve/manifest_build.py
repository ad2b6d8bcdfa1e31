"""The manifest of a model: traced once to record its inputs, outputs, heads and output kinds.

:func:`build_manifest` gives the typed :class:`~trainfer.serve.manifest.Manifest` of a model (everything
but the weights entry, which :func:`trainfer.serve.bundle_write.write_bundle` adds), validated exactly as a
reader will validate it. See :mod:`trainfer.serve.bundle` for the fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from trainfer.errors import BundleError, InputError
from trainfer.recipe import ModelRecipe, model_form, recipe_of
from trainfer.serve.architecture import describe
from trainfer.serve.bundle_format import FORMAT, FORMAT_VERSION
from trainfer.serve.outputs import Head, Selector, describe_structure, resolve_heads
from trainfer.serve.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = ["build_manifest", "writer_versions"]


def build_manifest(
    model: nn.Module,
    *,
    factory: str | None = None,
    config: Mapping[str, Any] | None = None,
    task: str | None = None,
    labels: Any = None,
    preprocess: PreprocessSpec | Mapping[str, Any] | None = None,
    example_inputs: Any = None,
    output_kind: str | Mapping[Any, str] | None = None,
    output: Selector = None,
    heads: Mapping[Any, str] | None = None,
    decoder: Mapping[str, Any] | None = None,
    architecture: bool = True,
) -> Manifest:
    """The manifest of ``model`` (everything but the weights entry), validated; see the module docstring.

    ``factory`` may stay ``None`` here (an exported file needs none); :func:`save` requires it.
    ``architecture=False`` leaves a deploy form's graph unrecorded: an exported file carries the graph
    itself, so a deploy form holding a module a bundle cannot describe may still be exported.
    ``decoder``: a sequence head's decoding settings (default: CTC's), checked against the token table.
    """
    from trainfer.modes.contexts import shared_inference
    from trainfer.serve import manifest as schema

    known = recipe_of(model)
    factory = factory or getattr(known, "factory", None)
    config = dict(config if config is not None else getattr(known, "config", {}))
    _check_json(config, "config")
    example = _example_inputs(model, example_inputs, known, preprocess)
    first = example[0] if example else None
    spec = PreprocessSpec.coerce(preprocess, input_shape=tuple(first.shape[1:]) if first is not None else None)
    spec = spec.with_dtype(first.dtype if first is not None else _parameter_dtype(model))
    if first is not None and spec.input_shape is not None and tuple(spec.input_shape) != tuple(first.shape[1:]):
        raise InputError(
            f"preprocess input_shape {list(spec.input_shape)} contradicts the example inputs' sample shape "
            f"{list(first.shape[1:])}: the bundle would serve inputs the model was not saved for"
        )
    with shared_inference(model):  # other threads may be serving the model: switched under its lock
        structure = describe_structure(model(*example)) if example else None
        resolved = resolve_heads(model, task, labels, output, heads, output_kind, example or None)
    form = model_form(model)
    if form == "deploy" and isinstance(model, fx.GraphModule) and first is None:
        raise InputError(
            "saving a deploy form records its graph, which a load checks on the example input shape: "
            "pass example_inputs= (a batch of one sample is enough)"
        )
    task_name = resolved[0].task if heads is None else "multi-head"
    return schema.build(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "factory": factory,
            "config": config,
            "form": form,
            "deploy_options": _deploy_options(model, known),
            "architecture": _architecture(model) if architecture and form == "deploy" else None,
            "input": {"shape": [1, *first.shape[1:]] if first is not None else None, "dtype": spec.dtype},
            "preprocess": spec.to_dict(),
            "task": task_name,
            "labels": _manifest_labels(resolved, heads is None),
            "heads": [head.to_dict() for head in resolved],
            "output_structure": structure,
            "versions": writer_versions(),
            **_decoder_entry(decoder, task_name, resolved[0].labels if heads is None else None),
        }
    )


def _decoder_entry(decoder: Mapping[str, Any] | None, task: str, labels: tuple[str, ...] | None) -> dict[str, Any]:
    """``{"decoder": settings}`` for a sequence head (or where settings are given), checked against the
    token table ``labels``; ``{}`` otherwise."""
    if decoder is None and task != "sequence":
        return {}
    from trainfer.serve.sequence import DecoderSettings

    settings = DecoderSettings.coerce(decoder)
    settings.table(labels or None)
    return {"decoder": settings.to_dict()}


def _architecture(model: nn.Module) -> dict[str, Any] | None:
    """The graph of a deploy form that ``trainfer.deploy`` traced (``None`` for another model), or a
    :class:`~trainfer.errors.BundleError` naming what cannot be recorded and the ways that work."""
    if not isinstance(model, fx.GraphModule):
        return None
    try:
        return describe(model)
    except BundleError as error:
        raise BundleError(
            f"{error}; to keep this model, save its training form with factory='package.module:function' "
            "(trainfer.save(model, path, factory=...)), or export this deploy form "
            "(trainfer.export(deployed, 'model.onnx', example_inputs=x): the file carries the graph)"
        ) from None


def _deploy_options(model: nn.Module, known: ModelRecipe | None) -> dict[str, Any]:
    """The options ``trainfer.deploy`` ran with (``{}`` for training forms), for the record."""
    report = getattr(model, "trainfer_report", None)
    return dict(getattr(known, "deploy_options", None) or getattr(report, "options", None) or {})


def _example_inputs(model: nn.Module, given: Any, known: ModelRecipe | None, preprocess: Any) -> tuple[Tensor, ...]:
    """The example inputs as a tuple: given, or random of the known input shape, or empty."""
    if given is not None:
        return tuple(given) if isinstance(given, tuple | list) else (given,)
    spec = PreprocessSpec.coerce(preprocess)
    shape = getattr(known, "input_shape", None) or ([1, *spec.input_shape] if spec.input_shape is not None else None)
    if shape is None:
        return ()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.randn(*shape, dtype=_parameter_dtype(model) or torch.float32, device=device),)


def _parameter_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _manifest_labels(heads: list[Head], single: bool) -> Any:
    if single:
        return list(heads[0].labels) if heads[0].labels is not None else None
    return {str(h.name): list(h.labels) for h in heads if h.labels is not None} or None


def writer_versions() -> dict[str, str]:
    """The versions a manifest records of the trainfer, torch and safetensors writing it."""
    import safetensors

    from trainfer._version import __version__

    return {"trainfer": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {error}") from None
