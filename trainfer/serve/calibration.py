"""The data quantization and pruning measure on: calibration/validation inputs and class-index labels.

:func:`calibration_inputs` takes a tensor/array, a data set or loader, or a path (raw files preprocessed as
the manifest says); :func:`class_indices` checks labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = ["calibration_inputs", "class_indices"]


def calibration_inputs(data: Any, manifest: Manifest, limit: int | None = None) -> Tensor:
    """Model inputs as one float32 batch from a tensor/array (model inputs), a data set or loader
    (items ``x`` or ``(x, label)``), or a path: a ``.npy``/``.csv``/image file or a directory of images
    and ``.npy`` files (raw inputs, preprocessed as the bundle's manifest says)."""
    from trainfer.serve.inputs import gather
    from trainfer.serve.preprocess import PreprocessSpec

    if isinstance(data, str | os.PathLike):
        spec = PreprocessSpec.coerce(manifest.preprocess_settings())
        path = Path(data)
        files = _input_files(path) if path.is_dir() else [str(path)]
        batch = spec.prepare(gather(files, spec))
    elif isinstance(data, Tensor | np.ndarray):
        batch = torch.as_tensor(data)
    else:
        batch = torch.cat([_first(item) for item in data])
    if not batch.is_floating_point() or batch.dim() < 2 or len(batch) == 0:
        raise InputError(f"calibration data must be a non-empty float batch (N, ...); got {tuple(batch.shape)}")
    batch = batch.detach().to("cpu", torch.float32)
    return batch[:limit] if limit else batch


def _first(item: Any) -> Tensor:
    value = item[0] if isinstance(item, tuple | list) else item
    value = torch.as_tensor(value)
    return value if value.dim() >= 2 and isinstance(item, tuple | list) and len(item[0]) != 1 else value[None]


def _input_files(directory: Path) -> list[str]:
    from trainfer.serve.readers import IMAGE_SUFFIXES

    files = sorted(str(p) for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
    if not files:
        raise InputError(f"no image or .npy files under {str(directory)!r} to calibrate with")
    return files


def label_column(labels: Tensor) -> Tensor:
    """Labels of shape ``(N, 1)`` (a column, as ``y.reshape(-1, 1)`` is often saved) as ``(N,)``; any other
    shape as given, for the caller to refuse: the one reading of a label column, for every labelled input."""
    return labels[:, 0] if labels.dim() == 2 and labels.shape[1] == 1 else labels


def class_indices(labels: Any, classes: int, count: int) -> Tensor:
    """``labels`` checked as ``count`` class indices of a ``classes``-way output, as an int64 ``(count,)`` tensor.

    The one check of labels for every accuracy gate (``trainfer.quantize``, ``trainfer.prune``,
    ``trainfer.compile``'s ``gate_data``, :func:`~trainfer.serve.gate.gate_report`). Takes shape ``(count,)``
    or ``(count, 1)`` (a column, as ``y.reshape(-1, 1)`` is often saved); refuses (:class:`InputError`)
    any other shape, anything but integers (a float, boolean or object array is not a list of class
    indices) and any value outside ``0 .. classes - 1``.
    """
    from trainfer.integers import as_signed

    try:
        values = as_signed(torch.as_tensor(labels))  # uint16..uint64 labels as int64: torch compares only those
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"labels must be class indices (integers); got {type(labels).__name__}: {error}") from None
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise InputError(f"labels must be integer class indices; got dtype {str(values.dtype).removeprefix('torch.')}")
    values = label_column(values)
    if values.dim() != 1 or len(values) != count:
        raise InputError(
            f"labels must hold one class index per validation input ({count}): shape ({count},) or ({count}, 1); "
            f"got shape {tuple(values.shape)}"
        )
    outside = values[(values < 0) | (values >= classes)]
    if len(outside):
        raise InputError(
            f"labels must be class indices in 0..{classes - 1} ({classes} classes); got {int(outside[0])} "
            f"({len(outside)} out of range)"
        )
    return values.long()
