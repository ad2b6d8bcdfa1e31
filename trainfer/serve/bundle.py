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

import hashlib
import importlib
import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from trainfer.atomic import atomic_directory, fsync_file, interrupted_write
from trainfer.errors import BundleError, BundleWarning, InputError
from trainfer.jsonfile import read_json
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
from trainfer.registry import ENTRY_POINT_GROUP, factory_name
from trainfer.registry import allowed_factory as allowed_factory_named
from trainfer.serve.architecture import check_computation, describe, rebuild
from trainfer.serve.outputs import Head, Selector, describe_structure, resolve_heads
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.validate import check_path

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "trainfer-bundle"
#: 2: deploy forms carry their ``architecture``; a version-1 deploy-form bundle built by
#: ``trainfer.deploy`` (rebuilt by replaying the fold) is refused, pointing to ``trainfer migrate``.
FORMAT_VERSION = 2
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
MAX_MANIFEST_BYTES = 16 * 2**20
#: A manifest's config may build at most this many times the weight elements its bundle stores
#: (a deploy form stores fewer than its training form), and always up to MIN_SIZE_LIMIT.
MAX_GROWTH = 16
MIN_SIZE_LIMIT = 2**20

__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "allowed_factory",
    "build_manifest",
    "build_model",
    "check_manifest",
    "load",
    "load_state_dict",
    "load_weights",
    "needs_migration",
    "read_bundle_weights",
    "read_manifest",
    "resolve_factory",
    "save",
    "weights_dtype",
    "write_bundle",
    "writer_versions",
    "write_safetensors",
]


# --------------------------------------------------------------------------- save
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
) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically) and return the path.

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
    """
    from trainfer.serve.sequence import is_autoregressive

    if decoder is not None and is_autoregressive(decoder):  # encode/step, not one forward: by its factory
        from trainfer.serve.generator_bundle import generator_manifest

        fields = generator_manifest(
            model,
            labels=labels,
            decoder=decoder,
            factory=factory,
            config=config,
            preprocess=preprocess,
            example_inputs=example_inputs,
        )
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "versions": writer_versions()}
        _check_rebuilds(model, manifest)
        return write_bundle(path, manifest, _tensors_to_save(model))
    manifest = build_manifest(
        model,
        factory=factory,
        config=config,
        task=task,
        labels=labels,
        preprocess=preprocess,
        example_inputs=example_inputs,
        output_kind=output_kind,
        output=output,
        heads=heads,
    )
    if decoder is not None or manifest["task"] == "sequence":
        from trainfer.serve.sequence import DecoderSettings

        settings = DecoderSettings.coerce(decoder)
        settings.table(tuple(manifest["labels"]) if manifest["labels"] else None)
        manifest["decoder"] = settings.to_dict()
    if not (manifest["factory"] or manifest["architecture"]):
        raise BundleError(
            "save needs factory='package.module:function' (a callable that rebuilds the architecture) "
            f"for a {type(model).__name__}; trainfer's own models carry it in their recipe, and a deploy form "
            "from trainfer.deploy records its architecture"
        )
    return write_bundle(path, manifest, _tensors_to_save(model))


def _check_rebuilds(model: nn.Module, manifest: dict[str, Any]) -> None:
    """The manifest's factory must rebuild ``model``'s weights (names and shapes), or the bundle would not load."""
    rebuilt, mine = build_model(manifest, trust_factory=True).state_dict(), model.state_dict()
    differ = sorted(
        k
        for k in rebuilt.keys() | mine.keys()
        if k not in rebuilt or k not in mine or rebuilt[k].shape != mine[k].shape
    )
    if differ:
        raise BundleError(
            f"factory {manifest['factory']!r} with config {manifest['config']} does not rebuild this model's weights "
            f"(differing: {differ[:5]}{' ...' if len(differ) > 5 else ''}); the bundle would not load"
        )


def write_bundle(
    path: str | os.PathLike[str],
    manifest: dict[str, Any],
    state: Mapping[str, Tensor],
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state`` and ``manifest`` (given its ``weights`` entry) as the bundle ``path``, atomically.

    ``check(staging)`` runs on the complete bundle before it replaces ``path``: raising there leaves
    ``path`` as it was. Refuses to replace a directory that is not a trainfer bundle.
    """
    target = Path(path)
    if target.exists() and not (target / MANIFEST_FILE).is_file():
        raise BundleError(f"refusing to overwrite {str(target)!r}: it exists and is not a trainfer bundle")
    with atomic_directory(target) as tmp:
        write_safetensors(state, tmp / WEIGHTS_FILE)
        manifest["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE), "tensors": len(state)}
        _write_json(tmp / MANIFEST_FILE, manifest)
        if check is not None:
            check(tmp)
    return target


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
) -> dict[str, Any]:
    """The manifest of ``model`` (everything but the weights entry); see the module docstring.

    ``factory`` may stay ``None`` here (an exported file needs none); :func:`save` requires it.
    """
    from trainfer.modes.contexts import shared_inference

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
    form = _form(model, known)
    if form == "deploy" and isinstance(model, fx.GraphModule) and first is None:
        raise InputError(
            "saving a deploy form records its graph, which a load checks on the example input shape: "
            "pass example_inputs= (a batch of one sample is enough)"
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "factory": factory,
        "config": config,
        "form": form,
        "deploy_options": _deploy_options(model, known),
        "architecture": describe(model) if form == "deploy" and isinstance(model, fx.GraphModule) else None,
        "input": {"shape": [1, *first.shape[1:]] if first is not None else None, "dtype": spec.dtype},
        "preprocess": spec.to_dict(),
        "task": resolved[0].task if heads is None else "multi-head",
        "labels": _manifest_labels(resolved, heads is None),
        "heads": [head.to_dict() for head in resolved],
        "output_structure": structure,
        "versions": writer_versions(),
    }


def _form(model: nn.Module, known: ModelRecipe | None) -> str:
    """``deploy`` for deploy forms (the recipe's form, or the report ``trainfer.deploy`` attaches)."""
    if known is not None:
        return known.form
    return "deploy" if hasattr(model, "trainfer_report") else "train"


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


def _tensors_to_save(model: nn.Module) -> dict[str, Tensor]:
    state = model.state_dict()
    others = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if others:
        raise BundleError(f"state_dict entries that are not tensors cannot be saved without pickle: {others}")
    # Clone: safetensors refuses tensors that share memory (tied weights) and non-contiguous views.
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}


def write_safetensors(state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` and flush it; a failure (disk full) is an ``OSError``.

    Meant for the temporary file of an atomic write, which then names the real target.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(state), str(path))
    except SafetensorError as error:  # safetensors reports I/O errors (ENOSPC) as its own type
        raise OSError(f"safetensors could not write: {error}") from error
    fsync_file(path)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    fsync_file(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of the bundle at ``path`` (the directory, or its ``manifest.json``).

    The whole manifest is checked against :mod:`trainfer.manifest` (types and size limits) before
    anything is built. Reading never moves anything: a bundle missing because a write was killed
    mid-replace (see :func:`trainfer.atomic.interrupted_write`) is reported, and left to the next write.
    """
    path = Path(path)
    previous = interrupted_write(path)
    if previous is not None:
        raise BundleError(
            f"no trainfer bundle at {str(path)!r}: a write to it was interrupted and left the previous version "
            f"in {previous.name!r}; the next write to {str(path)!r} (or trainfer.atomic.recover) puts it back"
        )
    file = path / MANIFEST_FILE if path.is_dir() else path
    if not file.is_file() or file.name != MANIFEST_FILE:
        raise BundleError(f"no trainfer bundle at {str(path)!r}: expected a directory holding {MANIFEST_FILE}")
    data = read_json(file, max_bytes=MAX_MANIFEST_BYTES, error=BundleError)
    return check_manifest(data, repr(str(file)))


def check_manifest(data: Any, source: str, *, bundle: bool = True) -> dict[str, Any]:
    """``data`` (parsed JSON) once validated as a manifest (``bundle``: one that rebuilds a model).

    Refuses a newer ``format_version``; warns (:class:`BundleWarning`) when the writer's trainfer is
    a newer major.minor release than this one, and when there is no ``preprocess`` section (inputs
    are then served without normalisation).
    """
    from trainfer.serve import manifest as schema

    version = data.get("format_version") if isinstance(data, dict) else None
    newer = _newer_writer(data)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise BundleError(
            f"{source} has format_version {version}; this trainfer reads up to {FORMAT_VERSION}"
            f"{newer and f' (written by trainfer {newer}): upgrade trainfer to load it'}"
        )
    try:
        manifest = schema.validate(data, source)
    except BundleError as error:
        raise BundleError(f"{error}{newer and f' (the bundle was written by a newer trainfer: {newer})'}") from None
    if newer:
        warnings.warn(f"{source} was written by a newer trainfer: {newer}", BundleWarning, stacklevel=3)
    needed = ("weights",) if manifest.architecture is not None else ("factory", "weights")
    missing = [key for key in needed if bundle and getattr(manifest, key) is None]
    if missing:
        raise BundleError(f"invalid manifest {source}: {', '.join(missing)}: required in a bundle (found null)")
    if manifest.preprocess is None:
        warnings.warn(
            f"{source} has no preprocess section: inputs are served as given, without normalisation",
            BundleWarning,
            stacklevel=3,
        )
    else:
        try:
            spec = PreprocessSpec.from_dict(manifest.preprocess.model_dump())
            shape = manifest.input.shape
            if shape and len(shape) > 1 and spec.input_shape is None:  # the channels the recorded input has
                PreprocessSpec.coerce(spec, input_shape=shape[1:])
        except ValueError as error:
            raise BundleError(f"invalid manifest {source}: preprocess: {error}") from None
    return data


def _newer_writer(data: Any) -> str:
    """``"X.Y, this is A.B"`` when ``data`` was written by a newer trainfer major.minor, else ``""``."""
    from trainfer._version import __version__
    from trainfer.serve.manifest import newer_writer

    versions = data.get("versions") if isinstance(data, dict) else None
    written = versions.get("trainfer") if isinstance(versions, dict) else None
    if isinstance(written, str) and len(written) < 64 and newer_writer(written, __version__):
        return f"{written}, this is {__version__}"
    return ""


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
    A deploy-form model is returned in eval mode, a training form in the mode its factory built.
    """
    path = check_path("path", path)
    manifest: dict[str, Any]
    if path.is_file() and path.name != MANIFEST_FILE:
        if factory is None:
            raise BundleError(f"{str(path)!r} is a bare checkpoint: pass factory='package.module:function' to load it")
        name = factory if isinstance(factory, str) else factory_name(factory)
        manifest = {"factory": name, "config": dict(config or {}), "form": "train", "input": {"shape": None}}
        state = load_weights(path)
    else:
        manifest = read_manifest(path)
        if config is not None:
            manifest["config"] = dict(config)
        state = read_bundle_weights(path if path.is_dir() else path.parent, manifest)
    stored = sum(value.numel() for value in state.values())
    model = build_model(manifest, weights_dtype(state), factory=factory, trust_factory=trust_factory, stored=stored)
    described = manifest.get("architecture") is not None
    try:
        load_state_dict(model, state, source=str(path), assign=described)
    except BundleError as error:
        origin = (
            "the manifest's architecture"
            if described
            else f"the manifest's factory {manifest['factory']!r}, config {manifest['config']}"
        )
        raise BundleError(f"{error} (the architecture comes from {origin})") from None
    if described:  # weights in place: what the graph computes is bounded before it computes anything
        graph = cast(fx.GraphModule, model)
        output = check_computation(graph, manifest["input"].get("shape"), f"{path}: architecture")
        _check_outputs(manifest, output, str(path))
    recipe = ModelRecipe(
        manifest["factory"],
        manifest["config"],
        manifest["input"].get("shape"),
        manifest["form"],
        manifest.get("deploy_options") or {},
    )
    attach_recipe(model, recipe)
    if manifest["form"] == "deploy":
        model.eval()  # an inference form is used in eval mode (a factory builds in train mode)
    return model


def _check_outputs(manifest: Mapping[str, Any], output: Any, source: str) -> None:
    """Refuse target scaling (``preprocess.target_mean``/``target_std``) of another width than its head."""
    from trainfer.serve.outputs import select_output

    preprocess = manifest.get("preprocess") or {}
    keys = ("target_mean", "target_std")
    scaling: dict[str, list[float]] = {key: preprocess[key] for key in keys if preprocess.get(key)}
    if output is None or not scaling:
        return
    for head in manifest.get("heads") or []:
        if head["task"] != "regression":
            continue
        values = select_output(output, Head.from_dict(head).select)
        width = values.shape[-1] if values.dim() > 1 else 1
        for key, value in scaling.items():
            if len(value) not in (1, width):
                raise BundleError(
                    f"invalid manifest {source!r}: preprocess.{key} holds {len(value)} values for a regression "
                    f"output of {width}: expected 1 or {width}"
                )


def read_bundle_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, Tensor]:
    """The weights a bundle's manifest names, once their sha256 matches the manifest's."""
    entry = manifest["weights"]
    file = directory / entry.get("file", WEIGHTS_FILE)
    if Path(entry.get("file", WEIGHTS_FILE)).name != entry.get("file", WEIGHTS_FILE) or file.suffix != ".safetensors":
        raise BundleError(
            f"manifest names weights file {entry.get('file')!r}; expected a .safetensors file in the bundle"
        )
    if not file.is_file():
        raise BundleError(f"bundle {str(directory)!r} lacks its weights file {file.name!r}")
    digest = _sha256(file)
    if entry.get("sha256") and digest != entry["sha256"]:
        raise BundleError(
            f"weights {str(file)!r} do not match the manifest: sha256 expected {entry['sha256']}, got {digest}"
        )
    return load_weights(file)


def load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt``/``.pth``/``.bin``/``.ckpt`` checkpoint, on CPU.

    Checkpoints go through ``torch.load(weights_only=True)``: a pickle that would import or call
    anything beyond tensors and containers is refused with :class:`BundleError` and never runs.
    A checkpoint dict wrapping the weights under ``state_dict``/``model``/``model_state_dict`` is
    unwrapped, and a ``module.`` prefix (DistributedDataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"weights file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise BundleError(f"cannot read safetensors file {str(path)!r}: {error}") from None
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise BundleError(
            f"unknown weights format {path.suffix!r} for {str(path)!r}: "
            f"expected .safetensors or one of {sorted(CHECKPOINT_SUFFIXES)}"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).split("\n\n")[-1].strip().splitlines()[0] if str(error) else "unsafe content"
        raise BundleError(
            f"refusing to load {str(path)!r}: the checkpoint is a pickle carrying code or objects other than "
            f"tensors, which loading would execute ({reason}); re-save it as a state dict of tensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise BundleError(f"cannot read checkpoint {str(path)!r}: {error}") from None
    return _state_from_checkpoint(data, path)


def _state_from_checkpoint(data: Any, path: Path) -> dict[str, Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise BundleError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    if data and all(key.startswith("module.") for key in data):
        data = {key.removeprefix("module."): value for key, value in data.items()}
    return data


def weights_dtype(state: Mapping[str, Tensor]) -> torch.dtype | None:
    """The one floating dtype of ``state``'s tensors (``None`` for none or several)."""
    dtypes = {value.dtype for value in state.values() if value.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """``package.module:function`` (dotted attributes allowed after the colon) to the callable.

    Imports the module: only for names the user gave (command line, ``factory=``), never for a
    name read from a bundle (see :func:`allowed_factory`).
    """
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise BundleError(f"factory must look like package.module:function; got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as error:
        raise BundleError(f"cannot import {module_name!r} for factory {spec!r}: {error}") from None
    except AttributeError:
        raise BundleError(f"module {module_name!r} has no attribute {attribute!r} (factory {spec!r})") from None
    if not callable(target):
        raise BundleError(f"factory {spec!r} is not callable")
    return target


def allowed_factory(
    name: str, factory: str | Callable[..., nn.Module] | None = None, trust_factory: bool = False
) -> Callable[..., nn.Module]:
    """The callable that may build the architecture a manifest names ``name``.

    ``factory`` given by the caller wins; else ``name`` must be allowed by :mod:`trainfer.registry`
    (nothing is imported unless it names an installed entry point), or ``trust_factory`` be set.
    """
    if callable(factory):
        return factory
    if isinstance(factory, str):
        return resolve_factory(factory)
    try:
        found = allowed_factory_named(name)
    except Exception as error:  # an installed entry point that fails to import: the user's package
        raise BundleError(f"the {ENTRY_POINT_GROUP!r} entry point for factory {name!r} failed: {error}") from error
    if found is not None:
        return found
    if trust_factory:
        return resolve_factory(name)
    raise BundleError(
        f"refusing to build factory {name!r}: a bundle may only name allowed factories (nothing was imported). "
        f"To allow it: decorate it with @trainfer.register_model in code you import before loading, declare it in "
        f"the {ENTRY_POINT_GROUP!r} entry-point group of your package, pass factory=<callable> to trainfer.load / "
        "Predictor.load, or, if you trust whoever wrote this bundle, trust_factory=True (CLI --trust-factory), "
        "which imports and runs that code"
    )


def build_model(
    manifest: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: bool = False,
    stored: int | None = None,
) -> nn.Module:
    """The architecture a manifest describes (train or deploy form), with fresh weights, on CPU.

    A manifest holding an ``architecture`` is rebuilt from it alone, on the meta device (load the weights with
    ``assign=True``); otherwise the factory is chosen by :func:`allowed_factory`
    (``factory``/``trust_factory`` as there). With ``stored`` (the number of weight elements the bundle
    holds), the factory first runs on the meta device: an architecture over ``MAX_GROWTH`` times ``stored`` is
    refused before any memory is allocated. A failure of the factory or of the deploy derivation (caused by
    the manifest's config) is a :class:`BundleError`.
    """
    if manifest["form"] not in ("train", "deploy"):
        raise BundleError(f"unknown bundle form {manifest['form']!r}: expected 'train' or 'deploy'")
    if manifest.get("architecture") is not None:
        return rebuild(manifest["architecture"], "manifest", manifest["input"].get("shape"))
    name, config = manifest["factory"], manifest["config"]
    if needs_migration(manifest):
        raise BundleError(
            f"this deploy-form bundle records no architecture and its factory {name!r} is not told deploy=True: "
            "it was written with format_version 1, whose deploy forms were rebuilt by replaying the fold; "
            "rewrite it once with `trainfer migrate OLD NEW` (trainfer.serve.migrate.migrate)"
        )
    build = allowed_factory(name, factory, trust_factory)
    if stored is not None:
        _check_size(build, name, config, stored)
    model = _call_factory(build, name, config)
    return model.to(dtype) if dtype is not None else model


def needs_migration(manifest: Mapping[str, Any]) -> bool:
    """Whether a (validated) manifest is a format-1 deploy form, which only a replay of the fold rebuilds
    (:mod:`trainfer.serve.migrate` rewrites it once)."""
    return (
        manifest["form"] == "deploy"
        and manifest.get("architecture") is None
        and manifest["config"].get("deploy") is not True
    )


def _call_factory(build: Callable[..., Any], name: str, config: Mapping[str, Any]) -> nn.Module:
    try:
        model = build(**config)
    except Exception as error:  # the factory is allowed code; what it failed on is the manifest's config
        raise BundleError(f"config: factory {name!r} failed on config {dict(config)}: {error}") from error
    if not isinstance(model, nn.Module):
        raise BundleError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_size(build: Callable[..., Any], name: str, config: Mapping[str, Any], stored: int) -> None:
    """Refuse a config whose architecture (built on the meta device) dwarfs the stored weights.

    A factory that cannot build on the meta device is skipped here (it is built normally).
    """
    try:
        with torch.device("meta"):
            probe = build(**config)
        size = sum(t.numel() for t in probe.state_dict().values() if isinstance(t, Tensor))
    except Exception:
        return
    if size > max(MAX_GROWTH * stored, MIN_SIZE_LIMIT):
        raise BundleError(
            f"config: factory {name!r} with config {dict(config)} builds {size} weight elements, but the bundle "
            f"stores {stored}: refusing to allocate more than {MAX_GROWTH}x the stored weights"
        )


def load_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], source: str = "the checkpoint", *, assign: bool = False
) -> None:
    """Load ``state`` into ``model`` strictly; mismatches raise :class:`BundleError` listing every name.

    ``assign=True`` (a model built on the meta device) makes the loaded tensors the model's own;
    a tensor ``state`` does not provide then stays on the meta device and is refused.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state[key].shape)}"
        for key in expected
        if key in state and tuple(expected[key].shape) != tuple(state[key].shape)
    ]
    parameters = [name for name, _ in model.named_parameters()]
    floats = [
        f"{key}: expected a floating dtype, got {state[key].dtype}"
        for key in parameters
        if key in state and not state[key].is_floating_point()
    ]
    found = (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes), ("not float", floats))
    problems = [f"{label} ({len(items)}): {', '.join(items)}" for label, items in found if items]
    if problems:
        raise BundleError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True, assign=assign)
    unloaded = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unloaded:
        raise BundleError(f"weights in {source} leave {type(model).__name__} tensors unset: {', '.join(unloaded)}")
