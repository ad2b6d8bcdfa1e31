"""Files sent to the convenience endpoint, read in memory: images, ``.npy`` arrays and CSV rows.

Nothing is written to disk and nothing is unpickled or evaluated. The kind of file is told by its
first bytes (the ``.npy`` magic), then by the name's suffix or the content type: ``.csv`` or
``text/csv`` are CSV rows; an image suffix, an ``image/*`` type or no suffix at all, an image
(Pillow then tells its format from its bytes). Sample ids are ``trainfer predict``'s: an
image is one sample named by its file name, a ``.npy`` array gives ``name[i]`` per row and a CSV
file ``name:i`` per data row (0-based), so the endpoint's JSON lines equal the command's.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from trainfer.errors import InputError
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import (
    CSV_ENCODING,
    IMAGE_SUFFIXES,
    check_csv_fits,
    check_npy_header,
    column_indices,
    load_checked_npy,
    load_image,
    npy_samples,
    parse_row,
)

__all__ = ["MAX_NAME", "read_upload"]

#: Longest file name an upload may give (it is only echoed back in the sample ids, never opened).
MAX_NAME = 255
_NPY_MAGIC = b"\x93NUMPY"


class _Named(io.BytesIO):
    """Bytes in memory that error messages name by the upload's file name."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.upload_name = name

    def __str__(self) -> str:
        return self.upload_name

    def __repr__(self) -> str:  # PIL names an unreadable file by its repr
        return repr(self.upload_name)


def read_upload(
    data: bytes, name: str, content_type: str, spec: PreprocessSpec, max_rows: int = 2**20
) -> list[tuple[str, Any]]:
    """``(id, raw batch)`` pairs of the file ``data`` called ``name`` (a batch holds one or more samples);
    CSV rows past ``max_rows`` are refused before they are read into numbers."""
    if not name or len(name) > MAX_NAME:
        raise InputError(f"the file name must have 1 to {MAX_NAME} characters; got {len(name)}")
    suffix = Path(name).suffix.lower()
    if not data:
        raise InputError(f"{name!r} is empty (0 bytes): expected an image, a .npy array or CSV rows")
    if data.startswith(_NPY_MAGIC):
        return _npy(data, name, spec)
    if suffix == ".npy":
        raise InputError(f"cannot read {name!r} as a .npy array: it does not start with the .npy magic bytes")
    if suffix == ".csv" or content_type.split(";")[0].strip() in ("text/csv", "text/plain"):
        return _csv(data, name, spec, max_rows)
    if suffix in IMAGE_SUFFIXES or content_type.startswith("image/") or not suffix:
        return [(name, load_image(_Named(data, name), spec).unsqueeze(0))]  # type: ignore[arg-type]
    raise InputError(f"cannot read {name!r}: expected an image ({', '.join(sorted(IMAGE_SUFFIXES))}), .csv or .npy")


def _npy(data: bytes, name: str, spec: PreprocessSpec) -> list[tuple[str, Any]]:
    """One raw sample per row of the ``.npy`` array in ``data`` (never unpickled; its header checked
    against the bytes present before any array is built, as ``trainfer predict`` checks a file)."""
    check_npy_header(io.BytesIO(data), name, len(data))
    array = npy_samples(load_checked_npy(io.BytesIO(data), name), name, spec)  # as trainfer predict checks a file
    return [(f"{name}[{i}]", array[i : i + 1]) for i in range(len(array))]


def _csv(data: bytes, name: str, spec: PreprocessSpec, max_rows: int) -> list[tuple[str, Any]]:
    """The CSV rows of ``data`` (a header, then rows of numbers), picked by ``spec.columns``; at most ``max_rows``."""
    check_csv_fits(spec, name)
    try:
        reader = csv.reader(io.StringIO(data.decode(CSV_ENCODING), newline=""))
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise InputError(f"CSV file {name!r} is empty: expected a header row of column names")
        indices = column_indices(header, spec, Path(name))
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            if row and len(rows) == max_rows:
                raise InputError(f"CSV file {name!r} holds more than {max_rows} rows: at most {max_rows} per request")
            if row:
                rows.append(parse_row(row, indices, header, Path(name), line))
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read CSV file {name!r}: {error}") from None
    if not rows:
        raise InputError(f"CSV file {name!r} has a header but no data rows: expected at least one row")
    return [(f"{name}:{i}", torch.tensor([row], dtype=torch.float64)) for i, row in enumerate(rows)]
