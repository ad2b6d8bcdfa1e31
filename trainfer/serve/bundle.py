"""Bundles: a model's weights and everything needed to rebuild and serve it, without pickle.

A bundle is a directory::

    my_model/
      model.safetensors   the state dict (safetensors: tensors only, no code)
      manifest.json       how to rebuild and serve the model (below)

``manifest.json`` holds ``factory`` (``package.module:function``) and its keyword ``config``; ``form``
(``train`` or ``deploy``); for a deploy form traced by ``trainfer.deploy`` (a ``torch.fx.GraphModule``), its
``architecture`` (:mod:`trainfer.serve.architecture`: the folded graph as declarative JSON over allow-listed
module types and functions); ``input`` (shape with batch dimension, dtype); ``preprocess`` (a
:class:`~trainfer.serve.preprocess.PreprocessSpec`); ``task``, ``labels`` and ``heads`` (each head's output,
task, labels, output kind and how the kind was decided); ``output_structure`` (tensor, tuple or dict); the
``trainfer``/``torch`` versions; and the weights' file name and sha256.

A manifest is untrusted input: loading validates all of it (:mod:`trainfer.manifest`: types and
size limits) and calls only a factory the user allowed (:mod:`trainfer.registry`), or one passed
explicitly; it never imports a module because a manifest names it (``trust_factory=True`` does).

Loading rebuilds the architecture with ``factory(**config)``, or, when the manifest holds an
``architecture``, from that description alone (no factory is imported or called; the modules are
built on the meta device, so nothing is allocated before the weights pass the strict key and shape
checks). A deploy form without an ``architecture`` (blocks ``reparameterize()``d in place) is
built by its factory, whose recorded config then says ``deploy=True``.

Saving is atomic: the bundle is written into a temporary directory beside the target, which then
replaces the previous bundle; an interrupted save leaves the previous bundle intact.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx, nn

from trainfer.errors import BundleError, InputError, MissingFileError
from trainfer.recipe import ModelRecipe, attach_recipe
from trainfer.registry import factory_name
from trainfer.serve.architecture import check_computation, rebuild
from trainfer.serve.bundle_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    check_manifest,
    needs_migration,
    read_manifest,
)
from trainfer.serve.bundle_write import save
from trainfer.serve.factories import call_factory, manifest_factory
from trainfer.serve.weights import (
    CHECKPOINT_SUFFIXES,
    check_finite_weights,
    load_state_dict,
    load_weights,
    read_bundle_weights,
    weights_dtype,
)
from trainfer.validate import check_path

if TYPE_CHECKING:  # pydantic is imported when a manifest is read or written, not by ``import trainfer``
    from pathlib import Path

    from trainfer.serve.manifest import Manifest

#: ``save``, ``load_weights``, ``read_manifest`` and ``check_manifest`` are documented under this module's
#: name (docs/serving.md, docs/security.md): they live in the modules of their concept and are named here.
__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "build_model",
    "check_manifest",
    "load",
    "load_weights",
    "read_manifest",
    "recipe_from",
    "save",
]


def load(
    path: str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    config: Mapping[str, Any] | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Rebuild the model of the bundle at ``path`` and load its weights (on CPU, never unpickling).

    The manifest's factory must be allowed (:mod:`trainfer.registry`: trainfer's models, those
    registered with :func:`trainfer.register_model` or installed as ``trainfer.models`` entry
    points); otherwise loading is refused before anything is imported. ``factory`` (a callable,
    or a ``package.module:function`` the caller names) builds the architecture instead, with
    ``config`` or the manifest's config. ``trust_factory=True`` imports and calls whatever the
    manifest names: it runs the bundle author's code, use it only for bundles you trust.

    ``path`` may also be a bare checkpoint (``.safetensors``, or ``.pt``/``.pth`` read with
    ``torch.load(weights_only=True)``) given with the ``factory`` (and ``config``) that builds it.
    A deploy-form model is returned in eval mode, a training form in the mode its factory built. Weights
    holding NaN (or a parameter inf) are refused (:func:`~trainfer.serve.weights.check_finite_weights`).
    """
    path = check_path("path", path)
    if factory is not None and path.suffix in {".safetensors", *CHECKPOINT_SUFFIXES} and not path.exists():
        raise MissingFileError(f"no checkpoint file at {str(path)!r}: expected the weights the factory's model takes")
    if path.is_file() and path.name != MANIFEST_FILE:
        if factory is None:
            raise BundleError(f"{str(path)!r} is a bare checkpoint: pass factory='package.module:function' to load it")
        manifest = _checkpoint_manifest(factory if isinstance(factory, str) else factory_name(factory), config)
        state = load_weights(path)
    else:
        manifest = read_manifest(path)
        if config is not None:
            manifest = manifest.model_copy(update={"config": dict(config)})
        state = read_bundle_weights(path if path.is_dir() else path.parent, manifest)
    stored = sum(value.numel() for value in state.values())
    model = build_model(manifest, weights_dtype(state), factory=factory, trust_factory=trust_factory, stored=stored)
    described = manifest.architecture is not None
    try:
        load_state_dict(model, state, source=str(path), assign=described)
    except BundleError as error:
        raise BundleError(f"{error} (the architecture comes from {_origin(manifest, path)})") from None
    check_finite_weights(model, str(path))
    if described:  # weights in place: what the graph computes is bounded before it computes anything
        graph = cast(fx.GraphModule, model)
        output = check_computation(graph, manifest.input_shape, f"{path}: architecture")
        _check_structure(manifest, output, str(path))
        _check_outputs(manifest, output, str(path))
    attach_recipe(model, recipe_from(manifest))
    if manifest.form == "deploy":
        model.eval()  # an inference form is used in eval mode (a factory builds in train mode)
    return model


def _origin(manifest: Manifest, path: Path) -> str:
    """Where the architecture that weights are loaded into comes from, for an error's last words."""
    if manifest.architecture is not None:
        return "the manifest's architecture"
    called = f"{manifest.factory!r}, config {manifest.config}"
    bare = path.is_file() and path.name != MANIFEST_FILE  # a checkpoint: the caller named the factory
    return f"the factory {called}" if bare else f"the manifest's factory {called}"


def _checkpoint_manifest(factory: str, config: Mapping[str, Any] | None) -> Manifest:
    """What a bare checkpoint's loading knows: the training form the caller's ``factory(**config)`` builds."""
    from trainfer._version import __version__
    from trainfer.serve.manifest import InputSpec, Manifest, Versions

    return Manifest.model_construct(  # the caller's own factory and config: nothing here was read from a file
        format=FORMAT,
        format_version=FORMAT_VERSION,
        factory=factory,
        config=dict(config or {}),
        form="train",
        input=InputSpec(),
        versions=Versions.model_construct(trainfer=__version__),
    )


def recipe_from(manifest: Manifest) -> ModelRecipe:
    """The :class:`~trainfer.recipe.ModelRecipe` a model rebuilt from ``manifest`` carries."""
    options = manifest.deploy_options.model_dump(mode="json", exclude_unset=True)
    shape = tuple(manifest.input_shape) if manifest.input_shape is not None else None
    return ModelRecipe(manifest.factory, manifest.config, shape, manifest.form, options)


def _check_structure(manifest: Manifest, output: Any, source: str) -> None:
    """Refuse an architecture that returns something else than a tensor, a tuple or a dict of tensors,
    or other than the ``output_structure`` the manifest records (its kind, length, fields or keys)."""
    from trainfer.serve.output_structure import describe_structure

    try:
        found = describe_structure(output)
    except InputError as error:
        raise BundleError(f"invalid manifest {source!r}: architecture: {error}") from None
    recorded = manifest.output_structure
    if recorded is not None and found != recorded.model_dump(exclude_none=True):
        raise BundleError(
            f"invalid manifest {source!r}: architecture returns {found}, but output_structure records "
            f"{recorded.model_dump(exclude_none=True)}"
        )


def _check_outputs(manifest: Manifest, output: Any, source: str) -> None:
    """Refuse target scaling (``preprocess.target_mean``/``target_std``) of another width than its head."""
    from trainfer.serve.outputs import select_output

    preprocess = manifest.preprocess
    scaling: dict[str, list[float]] = {}
    if preprocess is not None:
        given = {"target_mean": preprocess.target_mean, "target_std": preprocess.target_std}
        scaling = {key: value for key, value in given.items() if value}
    if output is None or not scaling:
        return
    for head in manifest.heads:
        if head.task != "regression":
            continue
        values = select_output(output, head.select)
        width = values.shape[-1] if values.dim() > 1 else 1
        for key, value in scaling.items():
            if len(value) not in (1, width):
                raise BundleError(
                    f"invalid manifest {source!r}: preprocess.{key} holds {len(value)} values for a regression "
                    f"output of {width}: expected 1 or {width}"
                )


def build_model(
    manifest: Manifest,
    dtype: torch.dtype | None = None,
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: bool = False,
    stored: int | None = None,
) -> nn.Module:
    """The architecture a manifest describes (train or deploy form), with fresh weights, on CPU.

    A manifest holding an ``architecture`` is rebuilt from it alone, on the meta device (load the weights with
    ``assign=True``); otherwise the factory is chosen by :func:`trainfer.serve.factories.manifest_factory`
    (``factory``/``trust_factory`` as there). With ``stored`` (the number of weight elements the bundle
    holds), the factory first runs on the meta device: an architecture over ``MAX_GROWTH`` times ``stored`` is
    refused before any memory is allocated. A failure of the factory or of the deploy derivation (caused by
    the manifest's config) is a :class:`BundleError`.
    """
    if manifest.architecture is not None:
        return rebuild(manifest.architecture, "manifest", manifest.input_shape)
    name, config = manifest.factory, manifest.config
    if name is None:
        raise BundleError("the manifest names neither an architecture nor a factory to build the model with")
    if needs_migration(manifest):
        raise BundleError(
            f"this deploy-form bundle records no architecture and its factory {name!r} is not told deploy=True: "
            "it was written with format_version 1, whose deploy forms were rebuilt by replaying the fold; "
            "rewrite it once with `trainfer migrate OLD NEW` (trainfer.serve.migrate.migrate)"
        )
    model = call_factory(manifest_factory(name, factory, trust_factory), name, config, stored)
    return model.to(dtype) if dtype is not None else model
