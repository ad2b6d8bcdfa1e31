"""Bundles of autoregressive sequence models: a factory, the weights and the decoder settings.

An autoregressive model is served through ``encode(inputs)`` and a loop of ``step(state, tokens)``
calls (:class:`trainfer.decoding.StepModel`), not through one forward. The bundle architecture
recorder (:mod:`trainfer.serve.architecture`) records the fx graph of one forward, so such a
bundle does not describe its architecture: it names the factory that rebuilds it, and loading it
is allowed only for factories :func:`trainfer.load` allows (trainfer's own, those registered with
:func:`trainfer.register_model` or installed as entry points; ``trust_factory=True`` otherwise).
Nothing the bundle itself holds is executed.

:func:`trainfer.save` with autoregressive ``decoder`` settings writes one, and checks before
writing that it will load and serve: the factory rebuilds exactly the model's weights (names and
shapes), the decoder settings fit the token table, and decoding the example inputs runs with every
step scoring the table's tokens (:func:`generator_manifest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from trainfer.errors import BundleError
from trainfer.modes.contexts import shared_inference
from trainfer.recipe import recipe_of
from trainfer.serve.outputs import Head, OutputKind
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.sequence import CheckedStep, DecoderSettings, autoregressive_results

__all__ = ["generator_manifest"]


def generator_manifest(
    model: nn.Module,
    *,
    labels: Any,
    decoder: DecoderSettings | Mapping[str, Any],
    factory: str | None = None,
    config: Mapping[str, Any] | None = None,
    preprocess: PreprocessSpec | Mapping[str, Any] | None = None,
    example_inputs: Tensor | None = None,
) -> dict[str, Any]:
    """The manifest fields of an autoregressive model (all but format, versions and weights), checked to decode.

    :func:`trainfer.serve.bundle.save` completes them, checks that the factory rebuilds the model's
    weights, and writes the bundle.
    """
    settings = DecoderSettings.coerce(decoder)
    if settings.kind != "autoregressive":
        raise BundleError(f"generator bundles hold autoregressive models; the decoder kind is {settings.kind!r}")
    if isinstance(model, fx.GraphModule) or not isinstance(model, nn.Module):
        raise BundleError(
            f"an autoregressive bundle needs the model as an nn.Module with encode() and step(), rebuilt by its "
            f"factory: the architecture recorder records one forward's graph, not a decoding loop; got "
            f"{type(model).__name__}"
        )
    if labels is None or isinstance(labels, str | bytes):
        raise BundleError("an autoregressive bundle needs labels: the token table step() scores, one string per id")
    table = settings.table(tuple(str(label) for label in labels))
    checked = CheckedStep(model, len(table.tokens))
    known = recipe_of(model)
    factory = factory or getattr(known, "factory", None)
    if not factory:
        raise BundleError(
            f"saving an autoregressive {type(model).__name__} needs factory='package.module:function' (the bundle "
            "architecture recorder records one forward's fx graph, not an encode/step decoding loop, so the "
            "bundle names the factory that rebuilds it; loading then needs that factory allowed)"
        )
    config = dict(config if config is not None else getattr(known, "config", {}))
    example = _example(model, example_inputs, known, PreprocessSpec.coerce(preprocess).input_shape)
    spec = PreprocessSpec.coerce(preprocess, input_shape=tuple(example.shape[1:])).with_dtype(example.dtype)
    head = Head(None, None, "sequence", table.tokens, OutputKind("log_probabilities", "step() returns log-probs"))
    manifest: dict[str, Any] = {
        "factory": factory,
        "config": config,
        "form": getattr(known, "form", "train"),
        "deploy_options": {},
        "architecture": None,
        "input": {"shape": [1, *example.shape[1:]], "dtype": spec.dtype},
        "preprocess": spec.to_dict(),
        "task": "sequence",
        "labels": list(table.tokens),
        "heads": [head.to_dict()],
        "output_structure": None,
        "decoder": settings.to_dict(),
    }
    with shared_inference(model):
        autoregressive_results(checked, example, table.tokens, settings)
    return manifest


def _example(model: nn.Module, given: Tensor | None, known: Any, sample_shape: tuple[int, ...] | None) -> Tensor:
    """The example batch: given, else random of the recipe's input shape or of one ``sample_shape`` (the
    preprocessing's ``input_shape``), as a deploy form's save takes it; refused when none exists."""
    if given is not None:
        if not isinstance(given, Tensor) or given.dim() < 1 or given.shape[0] < 1:
            raise BundleError("example_inputs must be a tensor batch with at least one item")
        return given
    shape = getattr(known, "input_shape", None) or ((1, *sample_shape) if sample_shape is not None else None)
    if shape is None:
        raise BundleError(
            "saving an autoregressive model needs example_inputs= (a batch of one sample is enough) "
            "or preprocess= with its input_shape"
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(*shape, dtype=dtype)
