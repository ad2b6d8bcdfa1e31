"""Weights I/O: a bundle's checksummed safetensors, bare checkpoints (never unpickling code), strict loading.

:func:`write_safetensors` writes tensors (into an atomic write's temporary file).

:func:`load_weights` reads ``.safetensors`` or ``torch.load(weights_only=True)`` checkpoints (unwrapping
``state_dict``/``model`` entries and DistributedDataParallel's ``module.`` prefix); :func:`read_bundle_weights`
opens a bundle's file once and loads it through that descriptor once its sha256 matches the manifest's;
:func:`load_state_dict` loads strictly, naming every mismatch; :func:`check_finite_weights` refuses NaN weights.
"""

from __future__ import annotations

import os
import pickle
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor, nn

from trainfer.atomic import fsync_file
from trainfer.digest import sha256
from trainfer.errors import BundleError
from trainfer.readfile import open_regular, present

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "check_finite_weights",
    "load_state_dict",
    "load_weights",
    "read_bundle_weights",
    "weights_dtype",
    "write_safetensors",
]


def read_bundle_weights(directory: Path, manifest: Manifest) -> dict[str, Tensor]:
    """The weights a bundle's manifest names, once their sha256 matches the manifest's.

    The schema allows only a plain ``*.safetensors`` file name (no directory part) and a hex digest.
    """
    entry = manifest.weights
    if entry is None:
        raise BundleError(f"bundle {str(directory)!r}: its manifest names no weights file")
    file = directory / entry.file
    if not present(file):  # a FIFO, a directory, a device: named as what it is
        raise BundleError(f"bundle {str(directory)!r} lacks its weights file {file.name!r}")
    with open_regular(file) as handle:  # opened once: a file put in its place afterwards is never read
        digest = sha256(handle)
        if digest != entry.sha256:
            raise BundleError(
                f"weights {str(file)!r} do not match the manifest: sha256 expected {entry.sha256}, got {digest}"
            )
        return _safetensors_state(handle, file)  # the file checked, not the name opened again


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
        with open_regular(path) as handle:
            return _safetensors_state(handle, path)
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


def _safetensors_state(handle: BinaryIO, path: Path) -> dict[str, Tensor]:
    """The tensors of the safetensors file open as ``handle`` (``path`` names it in errors), on CPU.

    Read through the open descriptor (its ``/proc/self/fd`` link: the file mapped, as safetensors maps
    a named file, so a 400 MB file peaks at 225 MB of memory where reading its bytes first took 983 MB),
    never through ``path`` again: a file put at that name after the caller checked this one is never
    read. Where ``/proc`` is missing, the file's bytes are read and loaded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    descriptor = _descriptor_link(handle)
    try:
        if descriptor is not None:
            return load_file(descriptor)
        handle.seek(0)
        return load(handle.read())
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"cannot read safetensors file {str(path)!r}: {error}") from None


def _descriptor_link(handle: BinaryIO) -> Path | None:
    """The ``/proc/self/fd`` link of the open file ``handle``, or None (no ``/proc``, no descriptor)."""
    try:
        link = Path(f"/proc/self/fd/{handle.fileno()}")
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return link if link.exists() else None


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
    problems = [f"{label} ({len(items)}): {_first(items)}" for label, items in found if items]
    if problems:
        hint = _prefix_hint(missing, unexpected)
        raise BundleError(f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems) + hint)
    model.load_state_dict(dict(state), strict=True, assign=assign)
    unloaded = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unloaded:
        raise BundleError(f"weights in {source} leave {type(model).__name__} tensors unset: {', '.join(unloaded)}")


def check_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse loaded weights no answer can come from, with a :class:`BundleError` naming the first such
    tensor: a NaN in any floating parameter or buffer, or an inf in a parameter (a buffer may hold -inf on
    purpose: an attention mask). Such a model would be served, and every prediction refused as holding NaN,
    telling its client to look at the inputs."""
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in tensors:
            if not tensor.is_floating_point():
                continue
            bad = int((tensor.isnan() if kind == "buffer" else ~tensor.isfinite()).sum())
            if bad:
                raise BundleError(
                    f"weights in {source}: {kind} {name!r} holds {bad} NaN or inf value(s) of {tensor.numel()}: "
                    "broken weights (a diverged training run?), no answer can come from them: expected finite numbers"
                )


#: Names listed per kind of mismatch in an error (the count says how many there are in all).
LISTED_NAMES = 5


def _first(items: list[str]) -> str:
    """The first :data:`LISTED_NAMES` of ``items``, and how many more."""
    more = len(items) - LISTED_NAMES
    return ", ".join(items[:LISTED_NAMES]) + (f", ... and {more} more" if more > 0 else "")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A hint when every missing name is present under one prefix (a training checkpoint that holds
    the model beside optimizer state, say), else ``""``."""
    if not missing:
        return ""
    for prefix in sorted({key.split(".", 1)[0] + "." for key in unexpected if "." in key}):
        if all(prefix + key in unexpected for key in missing):
            return (
                f" (the checkpoint holds these weights under the prefix {prefix!r} beside other entries: "
                "a training checkpoint? give the model's own state dict, or the training bundle)"
            )
    return ""


def write_safetensors(
    state: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` (and the text ``metadata``) to ``path``, keeping the mode ``path`` has, and flush it; a
    failure (disk full) is an ``OSError``.

    Meant for the temporary file of an atomic write, which then names the real target: its mode is the
    one the target gets (the umask's, or the replaced file's), and a missing ``path`` gets the umask's,
    as any new file. safetensors writes a file of its own, mode 0600, and renames it over ``path``: that
    mode is put back, else every weights file would be unreadable to a server running as another user.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))  # the umask applies, as to any new file
    mode = stat.S_IMODE(os.stat(path).st_mode)
    try:
        save_file(dict(state), str(path), metadata=dict(metadata) if metadata is not None else None)
    except SafetensorError as error:  # safetensors reports I/O errors (ENOSPC) as its own type
        raise OSError(f"safetensors could not write: {error}") from error
    os.chmod(path, mode)
    fsync_file(path)
