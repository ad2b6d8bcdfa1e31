"""Inputs of any accepted form (tensors, arrays, nested lists, file paths, iterables of them) as raw batches.

:func:`iter_raw` yields them lazily and in order (a CSV file in chunks of rows: bounded memory);
:func:`gather` concatenates them into one batch. Files are read by :mod:`trainfer.serve.readers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError, InputTypeError
from trainfer.serve.preprocess import PreprocessSpec, as_tensor
from trainfer.serve.readers import IMAGE_SUFFIXES, check_regular_file, iter_csv, load_image, load_npy

__all__ = ["gather", "iter_raw"]


def _is_path(item: Any) -> bool:
    return isinstance(item, str | Path)


def iter_raw(inputs: Any, spec: PreprocessSpec) -> Iterator[Tensor]:
    """Yield raw batches from ``inputs``, lazily: a path, an array-like, or an iterable of those.

    A CSV file yields chunks of rows (bounded memory); an image file one sample; a list of numbers
    is one array-like. Order is kept. ``None``, a number, a dict, bytes: ``TypeError``.
    """
    _check_inputs(inputs)
    if _is_path(inputs) or isinstance(inputs, Tensor | np.ndarray | np.generic):
        inputs = [inputs]
    elif isinstance(inputs, Sequence) and not any(_is_path(x) or isinstance(x, Tensor | np.ndarray) for x in inputs):
        inputs = [inputs]  # nested lists of numbers: one array-like
    for item in inputs:
        if _is_path(item):
            yield from _iter_file(Path(item), spec)
        else:
            batch = as_tensor(item)
            if spec.input_shape is not None and batch.dim() == len(spec.input_shape):
                batch = batch.unsqueeze(0)
            yield batch


def _check_inputs(inputs: Any) -> None:
    """Refuse what is not an input at all (and would otherwise fail obscurely or be misread)."""
    if isinstance(inputs, Tensor | np.ndarray | np.generic | str | Path):
        return  # numpy scalars are 0-d arrays, refused as such by the batch check
    if inputs is None or isinstance(inputs, int | float | complex | Mapping | bytes | bytearray):
        kind = "a dict (its keys would be read as paths)" if isinstance(inputs, Mapping) else type(inputs).__name__
        raise InputTypeError(
            "expected inputs as a tensor, an array, a (nested) list of numbers, a file path, or an iterable of "
            f"samples or paths; got {kind}" + (f" ({inputs!r})" if isinstance(inputs, int | float | complex) else "")
        )
    if not isinstance(inputs, Iterable):
        raise InputTypeError(
            f"expected inputs as a tensor, an array, a list, a file path or an iterable; got {type(inputs).__name__}"
        )


def _iter_file(path: Path, spec: PreprocessSpec) -> Iterator[Tensor]:
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a directory: expected image, .csv or .npy files (pass the files)")
    check_regular_file(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        yield load_image(path, spec).unsqueeze(0)
    elif suffix == ".csv":
        yield from iter_csv(path, spec)
    elif suffix == ".npy":
        yield load_npy(path, spec)
    else:
        raise InputError(
            f"cannot read {str(path)!r}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))}), .csv or .npy file"
        )


def gather(inputs: Iterable[Any], spec: PreprocessSpec) -> Tensor:
    """All of ``inputs`` as one raw batch (for inputs that fit in memory)."""
    chunks = list(iter_raw(inputs, spec))
    if not chunks:
        raise InputError(f"empty input: expected at least one sample of shape {spec._shape_text()}")
    try:
        return torch.cat(chunks)
    except RuntimeError:
        shapes = sorted({tuple(c.shape[1:]) for c in chunks})
        raise InputError(
            f"inputs have different sample shapes {shapes}: expected one shape {spec._shape_text()}"
        ) from None
