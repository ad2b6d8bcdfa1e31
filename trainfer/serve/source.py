"""A model or a bundle, as the deploy form that export, compile and quantize start from.

:func:`load_source` is the one resolver of "model or bundle -> deploy form": a model comes with the
manifest :func:`~trainfer.serve.manifest_build.build_manifest` records of it; a bundle path is loaded
(:func:`trainfer.load`, whose ``factory``/``trust_factory`` decide which code may build it) with its
manifest. A training form (:func:`trainfer.recipe.model_form`) is then deployed on the example inputs
(:func:`trainfer.deploy`, verified). The example inputs are the given batch, or random inputs of the
recorded input shape, in the manifest's dtype.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainfer.errors import InputError, InputTypeError
from trainfer.recipe import attach_recipe, model_form, recipe_of

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = ["Source", "check_class_gate", "check_searchable", "float32_copy", "load_source"]


@dataclass(frozen=True)
class Source:
    """The deploy form of a model or bundle, its manifest (``form`` ``deploy``) and the example batch.

    ``deployed_here``: the given model or bundle was a training form, deployed by :func:`load_source`.
    """

    model: nn.Module
    manifest: Manifest
    example: Tensor
    deployed_here: bool

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input sample (the example batch's shape without its batch dimension)."""
        return tuple(self.example.shape[1:])


def load_source(
    model_or_bundle: nn.Module | str | os.PathLike[str],
    example_inputs: Tensor | None = None,
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: bool = False,
) -> Source:
    """The deploy form of ``model_or_bundle`` (see the module docstring).

    Raises :class:`~trainfer.errors.InputError` when neither ``example_inputs`` nor the manifest gives the
    input shape, :class:`~trainfer.errors.InputTypeError` for example inputs that are not a float tensor.
    """
    from trainfer.serve.bundle import load
    from trainfer.serve.bundle_format import read_manifest
    from trainfer.serve.manifest_build import build_manifest

    if example_inputs is not None and not (isinstance(example_inputs, Tensor) and example_inputs.is_floating_point()):
        given = type(example_inputs).__name__
        raise InputTypeError(f"example_inputs must be a floating-point tensor batch; got {given}")
    if isinstance(model_or_bundle, nn.Module):
        # the served files carry the graph: a deploy form needs no recorded architecture
        model = model_or_bundle
        manifest = build_manifest(model, example_inputs=example_inputs, architecture=False)
    else:
        manifest = read_manifest(model_or_bundle)
        if manifest.decoder is not None and manifest.decoder.kind == "autoregressive":
            raise InputError(
                "an autoregressive sequence bundle decodes by a loop of encode() and step() calls, not one forward, "
                "so it is not exported, compiled, quantized or pruned whole: export its encoder, "
                "trainfer.export(model.encoder, path, example_inputs=x)"
            )
        model = load(model_or_bundle, factory=factory, trust_factory=trust_factory)
    example = _example(manifest, example_inputs)
    deployed_here = model_form(model) != "deploy"
    if deployed_here:
        from trainfer.reparam.deploy import deploy

        model = deploy(model.to("cpu"), example)
    return Source(model, manifest.model_copy(update={"form": "deploy"}), example, deployed_here)


def _example(manifest: Manifest, given: Tensor | None) -> Tensor:
    """``given`` in the manifest's dtype, or two random samples of the recorded input shape."""
    dtype = getattr(torch, manifest.input.dtype or "float32")
    if given is not None:
        return given.detach().to("cpu", dtype)
    shape = manifest.input_shape
    if not shape:
        raise InputError("this needs the input shape, which the manifest does not record: pass example_inputs")
    return torch.randn(2, *shape[1:], dtype=dtype)


def float32_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode, carrying its recipe and ``trainfer_report``
    (an FX deep copy drops them)."""
    copied = copy.deepcopy(model).to("cpu", torch.float32).eval()
    if hasattr(model, "trainfer_report"):
        copied.trainfer_report = copy.deepcopy(model.trainfer_report)
    return attach_recipe(copied, recipe_of(model))


def check_class_gate(manifest: Manifest, what: str) -> None:
    """Refuse to gate a sequence bundle (one whose manifest has a decoder) by :mod:`trainfer.serve.gate`.

    That gate compares each sample's argmax class with the float form's: on a CTC model's ``(N, T, C)``
    frames it measures per-frame classes, not the decoded strings a user is served, so a verdict
    there would say nothing true about sequence accuracy. ``what`` names the refused operation.
    """
    if manifest.decoder is not None:
        raise InputError(
            f"{what} is gated on per-sample class agreement, which says nothing about the strings a "
            f"{manifest.decoder.kind} sequence bundle decodes: it supports classification and regression bundles; "
            "serve a sequence bundle in float32"
        )


def check_searchable(manifest: Manifest, gated: bool, what: str, way_out: str) -> None:
    """Refuse, before anything is loaded or measured, a bundle the runtime search (``what``) cannot take.

    An encoder-decoder (autoregressive decoder) decodes by a loop of ``encode()`` and ``step()`` calls,
    not one forward, so it has no form whose runtimes could be measured; ``way_out`` says what to do
    instead. With gate data (``gated``), any sequence bundle is refused too (:func:`check_class_gate`).
    """
    if manifest.decoder is not None and manifest.decoder.kind == "autoregressive":
        raise InputError(
            f"{what} does not apply to an encoder-decoder (autoregressive sequence) bundle: it decodes by a loop "
            f"of encode() and step() calls, not one forward whose runtimes could be measured; {way_out}"
        )
    if gated:
        check_class_gate(manifest, "trainfer.compile with gate_data (--gate-data)")
