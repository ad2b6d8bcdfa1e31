"""Writing bundles, atomically: a model's weights (safetensors, never pickle) beside its manifest.

:func:`save` builds the manifest (:func:`trainfer.serve.manifest_build.build_manifest`) and
:func:`write_bundle` writes both into a temporary directory beside the target, which then replaces the
previous bundle: an interrupted save leaves the previous bundle intact. Replacing a directory deletes what
it held, so :func:`check_replaceable` refuses a target that is not a bundle, or that holds anything but the
files of one (the user's notes, data, ...): trainfer does not touch what it did not make. A file written
into the bundle while it is rewritten is not deleted either: only the previous version's
:func:`~trainfer.serve.bundle_format.own_files` are (:func:`trainfer.atomic.replace_directory`'s ``own``), and
a previous version holding anything else is kept beside the bundle, with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainfer.atomic import atomic_directory, fsync_file, named, recover
from trainfer.digest import sha256
from trainfer.errors import BundleError
from trainfer.serve.bundle_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    bundle_files,
    own_files,
    read_manifest,
)
from trainfer.serve.factories import call_factory, manifest_factory
from trainfer.serve.manifest_build import build_manifest, writer_versions
from trainfer.serve.outputs import Selector
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.weights import write_safetensors

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = [
    "bundle_manifest",
    "check_replaceable",
    "save",
    "save_derived",
    "tensors_to_save",
    "write_bundle",
    "write_safetensors",
]


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
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
    like: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically) and return the path.

    ``like``: the bundle ``model`` is a form of (its deploy, pruned or fine-tuned form): the new bundle serves as
    that one does, with its task, labels, heads, preprocessing and decoder
    (:meth:`~trainfer.serve.manifest.Manifest.derived_metadata`, what ``trainfer deploy BUNDLE`` carries, through
    :func:`save_derived`): ``save(trainfer.deploy(trainfer.load(b), x), out, like=b)``. The keywords given here
    (not None) replace its values.

    ``decoder``: the ``sequence`` task's decoding settings (:class:`trainfer.serve.sequence.DecoderSettings`),
    checked against the labels (the token table) and recorded in the manifest. Autoregressive settings
    save an ``encode``/``step`` model by its factory (:mod:`trainfer.serve.generator_bundle`).

    ``factory``/``config``/input shape default to the model's recipe (:func:`trainfer.recipe_of`:
    trainfer's own models and deploy forms carry one). A deploy form that ``trainfer.deploy`` traced
    records its architecture and needs no factory. Output kinds not given are detected from the
    traced eval graph. The model is not modified (its modes are restored), and may be in use by
    other threads meanwhile: a model not in eval is switched under the lock a
    :class:`~trainfer.Predictor` serving it takes (:func:`trainfer.modes.contexts.shared_inference`),
    and tracing never disturbs its calls from other threads (:mod:`trainfer.reparam.fold.trace`).

    The bundle must be one that loads: ``model``'s outputs on the load's probe inputs are checked against the
    manifest's heads as :func:`save_derived` checks them (labels for the classes it outputs, finite outputs),
    else :class:`BundleError` before anything is written. An output kind the caller declares is the caller's
    word, as it is to a :class:`~trainfer.Predictor` (a warning at the first prediction, a load may override it):
    not checked here.
    """
    metadata = {
        "factory": factory,
        "config": config,
        "task": task,
        "labels": labels,
        "preprocess": preprocess,
        "example_inputs": example_inputs,
        "output_kind": output_kind,
        "output": output,
        "heads": heads,
        "decoder": decoder,
    }
    if like is not None:
        given = {name: value for name, value in metadata.items() if value is not None}
        return save_derived(model, path, read_manifest(like), **given)
    manifest = bundle_manifest(model, **metadata)
    _check_heads_fit(model, manifest, repr(str(path)), kinds=False)
    return write_bundle(path, manifest, tensors_to_save(model))


def save_derived(
    model: nn.Module,
    path: str | os.PathLike[str],
    source: Manifest,
    finish: Callable[[Path], None] | None = None,
    **metadata: Any,
) -> Path:
    """Write ``model``, a form derived from the bundle whose manifest is ``source`` (its deploy, pruned or int8
    form), as a bundle at ``path`` that serves as that bundle does (:meth:`Manifest.derived_metadata`;
    ``metadata``: further :func:`save` keywords; ``finish`` as :func:`write_bundle`'s), atomically.

    What is carried over must fit the derived model as any bundle's load requires
    (:func:`trainfer.serve.served_checks.check_declared_heads`: labels for the classes it outputs, output kinds
    its outputs do not contradict): otherwise :class:`BundleError` before anything is written, as a bundle
    that no load accepts is no deployment of the source. A head keeps the source's ``output_kind_decided_by``
    where its output kind is the source's: carried over, it was decided as it was there.
    """
    manifest = _decided_as(bundle_manifest(model, **{**source.derived_metadata(), **metadata}), source)
    _check_heads_fit(model, manifest, repr(str(path)))
    return write_bundle(path, manifest, tensors_to_save(model), finish)


def _decided_as(manifest: Manifest, source: Manifest) -> Manifest:
    """``manifest`` whose heads of the same name and output kind as ``source``'s say why as those do."""
    reasons = {(head.name, head.output_kind): head.output_kind_decided_by for head in source.heads}
    heads = [
        head.model_copy(update={"output_kind_decided_by": reasons[head.name, head.output_kind]})
        if head.output_kind is not None and reasons.get((head.name, head.output_kind))
        else head
        for head in manifest.heads
    ]
    return manifest.model_copy(update={"heads": heads})


def _check_heads_fit(model: nn.Module, manifest: Manifest, source: str, kinds: bool = True) -> None:
    """The load-time check of ``manifest``'s heads (``kinds``: their output kinds too) against ``model``'s outputs
    on the probe inputs (a model that generates, by encode/step, has no single forward to check), on the model's
    device."""
    from trainfer.modes.contexts import shared_inference
    from trainfer.serve.outputs import Head
    from trainfer.serve.served_checks import check_declared_heads, probe_inputs

    spec = PreprocessSpec.from_dict(manifest.preprocess_settings() or {})
    generates = manifest.decoder is not None and manifest.decoder.kind == "autoregressive"
    if spec.input_shape is None or generates:
        return
    heads = [Head.from_dict(head) for head in manifest.head_settings()]

    device = next((tensor.device for tensor in [*model.parameters(), *model.buffers()]), torch.device("cpu"))

    def forward(batch: Tensor) -> Any:
        with shared_inference(model):
            return model(batch.to(device))

    probes = probe_inputs(spec.input_shape, spec.torch_dtype)
    check_declared_heads(forward, heads, probes, source, kinds, refusing="refusing to write it")


def bundle_manifest(model: nn.Module, **metadata: Any) -> Manifest:
    """The manifest :func:`save` writes for ``model`` (``metadata``: :func:`save`'s keywords), without its
    ``weights`` entry (:func:`write_bundle` adds it)."""
    from trainfer.serve.sequence import is_autoregressive

    decoder = metadata.get("decoder")
    if decoder is not None and is_autoregressive(decoder):  # encode/step, not one forward: by its factory
        names = ("factory", "config", "preprocess", "example_inputs", "labels", "decoder")
        return _generator_manifest(model, **{name: metadata.get(name) for name in names})
    manifest = build_manifest(model, **metadata)
    if not (manifest.factory or manifest.architecture):
        raise BundleError(
            "save needs factory='package.module:function' (a callable that rebuilds the architecture) "
            f"for a {type(model).__name__}; trainfer's own models carry it in their recipe, and a deploy form "
            "from trainfer.deploy records its architecture"
        )
    return manifest


def _generator_manifest(model: nn.Module, **options: Any) -> Manifest:
    """An autoregressive model's manifest (:func:`trainfer.serve.generator_bundle.generator_manifest`'s fields)."""
    from trainfer.serve import manifest as schema
    from trainfer.serve.generator_bundle import generator_manifest

    fields = generator_manifest(model, **options)
    manifest = schema.build(
        {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "versions": writer_versions()}
    )
    _check_rebuilds(model, manifest)
    return manifest


def _check_rebuilds(model: nn.Module, manifest: Manifest) -> None:
    """The manifest's factory must rebuild ``model``'s weights (names and shapes), or the bundle would not load."""
    name = str(manifest.factory)
    rebuilt = call_factory(manifest_factory(name, None, trust_factory=True), name, manifest.config).state_dict()
    mine = model.state_dict()
    differ = sorted(
        k
        for k in rebuilt.keys() | mine.keys()
        if k not in rebuilt or k not in mine or rebuilt[k].shape != mine[k].shape
    )
    if differ:
        raise BundleError(
            f"factory {name!r} with config {manifest.config} does not rebuild this model's weights "
            f"(differing: {differ[:5]}{' ...' if len(differ) > 5 else ''}); the bundle would not load"
        )


def write_bundle(
    path: str | os.PathLike[str],
    manifest: Manifest,
    state: Mapping[str, Tensor],
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state`` and ``manifest`` (given its ``weights`` entry) as the bundle ``path``, atomically.

    ``finish(staging)`` runs on the complete bundle before it replaces ``path``, to check it or to add files
    of the bundle (the int8 form): raising there leaves ``path`` as it was. Refuses to replace anything but a
    bundle of trainfer's files (:func:`check_replaceable`), and deletes only those
    (:func:`~trainfer.serve.bundle_format.own_files`).
    """
    from trainfer.serve import manifest as schema

    target = Path(path)
    check_replaceable(target)
    with atomic_directory(target, own=own_files) as tmp:
        write_safetensors(state, tmp / WEIGHTS_FILE)
        weights = {"file": WEIGHTS_FILE, "sha256": sha256(tmp / WEIGHTS_FILE), "tensors": len(state)}
        _write_json(tmp / MANIFEST_FILE, schema.build({**manifest.to_json(), "weights": weights}).to_json())
        if finish is not None:
            finish(tmp)
    return target


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Refuse (:class:`BundleError`) to replace ``path`` unless it is missing or a trainfer bundle holding nothing
    but its :func:`~trainfer.serve.bundle_format.own_files`: replacing the directory would delete everything
    else in it. What a killed write of one of its files left (``trainfer compile`` killed while writing
    ``runtime.json``: its temporary file and journal) is removed first (:func:`trainfer.atomic.recover`), never
    a file trainfer cannot prove it made. The refusal names up to :data:`trainfer.atomic.SHOWN_ENTRIES` of the
    other entries. Cheap (a few directory listings, at most one small record read): commands call it before
    their work.
    """
    target = Path(path)
    if not target.exists():
        return
    if not (target / MANIFEST_FILE).is_file():
        raise BundleError(f"refusing to overwrite {str(target)!r}: it exists and is not a trainfer bundle")
    for name in bundle_files():
        recover(target / name)
    others = set(os.listdir(target)) - set(own_files(target))
    if others:
        raise BundleError(
            f"refusing to overwrite the bundle {str(target)!r}: it also holds {named(others)}, which are not "
            "files of a trainfer bundle and would be deleted: move them out of it, or write to another path"
        )


def tensors_to_save(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict as :func:`write_bundle` takes it: detached, contiguous copies on the CPU."""
    state = model.state_dict()
    others = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if others:
        raise BundleError(f"state_dict entries that are not tensors cannot be saved without pickle: {others}")
    # Clone: safetensors refuses tensors that share memory (tied weights) and non-contiguous views.
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    fsync_file(path)
