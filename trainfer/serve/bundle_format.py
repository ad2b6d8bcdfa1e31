"""The bundle format: its files, its format version, and reading a manifest (validated, version policy).

A bundle is a directory holding :data:`WEIGHTS_FILE` and :data:`MANIFEST_FILE` (see :mod:`trainfer.serve.bundle`),
and maybe the other files :func:`bundle_files` names; :func:`own_files` says which entries of a bundle directory
are trainfer's (the only ones a rewrite deletes), checking the int8 record (:func:`int8_record`) by its content.
:func:`read_manifest` and :func:`check_manifest` turn the untrusted JSON into the typed
:class:`~trainfer.serve.manifest.Manifest`: a newer ``format_version`` is refused, a manifest written by a newer
trainfer major.minor warns (:class:`~trainfer.errors.BundleWarning`), and :func:`needs_migration` names the
format-1 deploy forms that ``trainfer migrate`` rewrites.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainfer.atomic import FILE, interrupted_write
from trainfer.errors import BundleError, BundleWarning
from trainfer.jsonfile import read_json
from trainfer.readfile import present
from trainfer.serve.preprocess import PreprocessSpec

if TYPE_CHECKING:  # pydantic is imported when a manifest is read or written, not by ``import trainfer``
    from trainfer.serve.manifest import Manifest

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
#: The int8 form a bundle may carry (``trainfer quantize``, or ``trainfer compile``'s int8 choice: see
#: :mod:`trainfer.serve.int8_form`): a QDQ ONNX file and its record.
QUANTIZED_FILE = "quantized.onnx"
QUANTIZATION_FILE = "quantization.json"
#: What :func:`trainfer.serve.int8_form.retire_int8_form` renames :data:`QUANTIZATION_FILE` to while it
#: removes the files it names.
RETIRED_FILE = "quantization.json.retired"
#: The writers an int8 record's ``made_by`` names: ``trainfer quantize`` (a bundle of its own),
#: ``trainfer compile``'s int8 choice (which a later compile may retire).
MADE_BY = ("trainfer quantize", "trainfer compile")
FORMAT = "trainfer-bundle"
#: 2: deploy forms carry their ``architecture``; a version-1 deploy-form bundle built by
#: ``trainfer.deploy`` (rebuilt by replaying the fold) is refused, pointing to ``trainfer migrate``.
FORMAT_VERSION = 2
MAX_MANIFEST_BYTES = 16 * 2**20

__all__ = [
    "MADE_BY",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "bundle_files",
    "check_manifest",
    "int8_record",
    "needs_migration",
    "own_files",
    "own_int8_record",
    "read_manifest",
]


def bundle_files() -> frozenset[str]:
    """The names of every file a bundle trainfer writes may hold, each constant taken from the module that writes
    it: the float form (:data:`MANIFEST_FILE`, :data:`WEIGHTS_FILE`), the recorded runtime (``runtime.json``), the
    int8 form (``quantized.onnx``, ``quantization.json``, ``probes.safetensors``, and ``quantization.json.retired``
    while a later ``trainfer compile`` removes it). Anything else in a bundle directory is someone else's."""
    from trainfer.serve.runtime_record import RUNTIME_FILE
    from trainfer.serve.served_checks import PROBES_FILE

    return frozenset(
        (MANIFEST_FILE, WEIGHTS_FILE, RUNTIME_FILE, QUANTIZED_FILE, QUANTIZATION_FILE, PROBES_FILE, RETIRED_FILE)
    )


def own_files(directory: Path) -> dict[str, int]:
    """The entries of the bundle ``directory`` that trainfer wrote, the only ones a rewrite deletes, each a
    :data:`trainfer.atomic.FILE` (:data:`trainfer.atomic.OwnFiles`): regular files (not links, not directories)
    named in :func:`bundle_files`, and of those :data:`RETIRED_FILE` only when it holds trainfer's int8 record
    (:func:`own_int8_record`): a file of that name is otherwise someone else's."""
    known = bundle_files()
    with os.scandir(directory) as entries:
        files = [e.name for e in entries if e.name in known and e.is_file(follow_symlinks=False)]
    return {name: FILE for name in files if name != RETIRED_FILE or own_int8_record(directory / name) is not None}


def own_int8_record(file: Path) -> dict[str, Any] | None:
    """The int8 record at ``file`` when it is a regular file (not a link) holding trainfer's, else ``None``."""
    if file.is_symlink() or not file.is_file():
        return None
    try:
        return int8_record(read_json(file, error=BundleError), file)
    except BundleError:
        return None


def int8_record(entry: Any, file: Path) -> dict[str, Any]:
    """``entry``, read from ``file``, when it is a trainfer int8 record (else :class:`BundleError`)."""
    if (
        not isinstance(entry, dict)
        or entry.get("format") != "trainfer-quantized"
        or entry.get("file") != QUANTIZED_FILE
    ):
        raise BundleError(
            f'{str(file)!r} is not a trainfer int8 record (expected "format": "trainfer-quantized", '
            f'"file": "{QUANTIZED_FILE}")'
        )
    return entry


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
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
    if file.name == MANIFEST_FILE:
        present(file)  # a FIFO, a directory, a device, a dangling link: named as what it is
    if not file.is_file() or file.name != MANIFEST_FILE:
        raise BundleError(f"no trainfer bundle at {str(path)!r}: expected a directory holding {MANIFEST_FILE}")
    data = read_json(file, max_bytes=MAX_MANIFEST_BYTES, error=BundleError)
    return check_manifest(data, repr(str(file)))


def check_manifest(data: Any, source: str, *, bundle: bool = True) -> Manifest:
    """``data`` (parsed JSON) validated as a typed manifest (``bundle``: one that rebuilds a model).

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
    return manifest


def _newer_writer(data: Any) -> str:
    """``"X.Y, this is A.B"`` when ``data`` was written by a newer trainfer major.minor, else ``""``."""
    from trainfer._version import __version__
    from trainfer.serve.manifest import newer_writer

    versions = data.get("versions") if isinstance(data, dict) else None
    written = versions.get("trainfer") if isinstance(versions, dict) else None
    if isinstance(written, str) and len(written) < 64 and newer_writer(written, __version__):
        return f"{written}, this is {__version__}"
    return ""


def needs_migration(manifest: Manifest) -> bool:
    """Whether a (validated) manifest is a format-1 deploy form, which only a replay of the fold rebuilds
    (:mod:`trainfer.serve.migrate` rewrites it once)."""
    return manifest.form == "deploy" and manifest.architecture is None and manifest.config.get("deploy") is not True
