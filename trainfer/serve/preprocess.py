"""What a model expects as input, and how raw inputs (arrays, images, CSV rows) become that.

A :class:`PreprocessSpec` is the preprocessing a model was trained with, stored in the bundle
manifest so serving repeats it exactly. Every input goes through two stages:

1. **load** — files and array-likes become a *raw* batch ``(N, *input_shape)``. Images are
   converted to the channel count of ``input_shape`` (grayscale ``L``, ``RGB``, optionally ``BGR``),
   resized to its height and width, and scaled by ``pixel_scale`` (``1/255``: bytes to ``[0, 1]``);
   16-bit images (PIL modes ``I;16*`` and ``I``, values ``0..65535``) are first scaled by
   ``255/65535`` and float images (mode ``F``, values in ``[0, 1]``) by ``255``, so that every
   bit depth of one picture gives the same sample; images over :data:`MAX_IMAGE_PIXELS` pixels are
   refused before decoding. CSV files give one sample per row, with the ``columns`` picked by
   name; arrays and tensors are taken as they are (a single sample without its batch dimension
   gets one).
2. **prepare** — the raw batch is validated (non-empty, numeric, the expected shape, finite) and
   normalised: ``x' = (x - mean) / std`` per channel (dimension 1 of the batch), cast to ``dtype``;
   ``x'`` is checked finite again (``1e300`` is finite as float64, inf as float32).

Regression targets scaled for training as ``t' = (t - target_mean) / target_std`` are mapped back
by :meth:`PreprocessSpec.unscale_target`: ``t = t' * target_std + target_mean``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError, InputTypeError, MissingFileError, NonFiniteError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_CSV_CHUNK_ROWS = 1024
#: The largest image (width x height) trainfer decodes: 64 megapixels, e.g. 8000 x 8000. Larger
#: ones (decompression bombs: a small file claiming a huge size) are refused before decoding.
MAX_IMAGE_PIXELS = 64_000_000
#: Full-scale value of single-channel images deeper than 8 bits, by PIL mode (mapped to 255).
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
_NPY_MAGIC = b"\x93NUMPY"
#: The most elements a ``.npy`` input read into memory may hold: 2**30 (4 GiB of float32). Its
#: header is checked before any data is read; a header declaring more data than the file holds is
#: refused too (memory-mapped reads are bounded by the file itself).
MAX_NPY_ELEMENTS = 2**30

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_NPY_ELEMENTS",
    "PreprocessSpec",
    "gather",
    "iter_csv",
    "iter_raw",
    "load_image",
    "load_npy",
    "read_npy",
]


def _floats(values: Any) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, int | float):
        return (float(values),)
    return tuple(float(v) for v in values)


#: Pillow's resampling filters by name; ``box`` maps an image enlarged by an integer factor back exactly.
_RESAMPLING = ("bilinear", "box", "nearest", "bicubic", "lanczos")


@dataclass(frozen=True)
class PreprocessSpec:
    """The input contract of a model (one sample: ``input_shape``, without the batch dimension).

    ``input_shape`` is ``(C, H, W)`` for images, ``(F,)`` for tables; ``None`` accepts any batch
    (then a single sample must carry its batch dimension). ``mean``/``std`` hold one value per
    channel (or column), or one value for all. ``columns`` names the CSV columns in model order
    (and implies ``input_shape = (len(columns),)``).
    """

    input_shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pixel_scale: float = 1 / 255
    channel_order: str = "RGB"
    resize: bool = True
    resample: str = "bilinear"
    columns: tuple[str, ...] | None = None
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.input_shape is not None:
            set_(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if self.columns is not None:
            set_(self, "columns", tuple(str(c) for c in self.columns))
            if self.input_shape is None:
                set_(self, "input_shape", (len(self.columns),))
        for name in ("mean", "std", "target_mean", "target_std"):
            set_(self, name, _floats(getattr(self, name)))
        if self.dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise InputError(f"preprocess dtype must be float32/float64/float16/bfloat16; got {self.dtype!r}")
        if self.resample not in _RESAMPLING:
            raise InputError(f"resample must be one of {', '.join(_RESAMPLING)}; got {self.resample!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"channel_order must be 'RGB' or 'BGR'; got {self.channel_order!r}")
        for name in ("mean", "std"):
            values, channels = getattr(self, name), self.input_shape[0] if self.input_shape else None
            if values is not None and channels is not None and len(values) not in (1, channels):
                raise InputError(
                    f"{name} holds {len(values)} values for {channels} channel(s) (input_shape {self.input_shape}): "
                    f"expected {channels} (one per channel) or 1 (one for all)"
                )
        if self.std is not None and any(s == 0 for s in self.std):
            raise InputError(f"std must be non-zero; got {self.std}")
        if self.columns is not None and self.input_shape is not None and self.input_shape != (len(self.columns),):
            raise InputError(
                f"{len(self.columns)} columns need input_shape ({len(self.columns)},); got {self.input_shape}"
            )

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists); :meth:`from_dict` inverts it."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PreprocessSpec:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown preprocess keys {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, spec: PreprocessSpec | Mapping[str, Any] | None, **defaults: Any) -> PreprocessSpec:
        """Accept a spec, a dict or ``None``; ``defaults`` fill fields the given spec leaves unset."""
        if isinstance(spec, PreprocessSpec):
            data = spec.to_dict()
        else:
            data = dict(spec or {})
        for key, value in defaults.items():
            if data.get(key) is None and value is not None:
                data[key] = value
        return cls.from_dict(data)

    def with_dtype(self, dtype: torch.dtype | None) -> PreprocessSpec:
        """This spec with ``dtype`` set to a floating ``dtype`` (the model's); unchanged for ``None``."""
        if dtype is None or not dtype.is_floating_point:
            return self
        return replace(self, dtype=str(dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    # ----------------------------------------------------------------- prepare
    def prepare(self, raw: Tensor, first: int = 0) -> Tensor:
        """Validate a raw batch and normalise it: ``(x - mean) / std`` per channel, as ``dtype``.

        ``first`` is the index of the batch's first sample among all inputs (named in errors).
        """
        return self.normalize(self.check_batch(raw, first), first)

    def normalize(self, batch: Tensor, first: int = 0) -> Tensor:
        """``(batch - mean) / std`` per channel, as ``dtype``, for a batch :meth:`check_batch` accepted.

        Raises :class:`~trainfer.errors.NonFiniteError` naming the samples (numbered from
        ``first``) that the cast or the normalisation took out of ``dtype``'s range.
        """
        batch = batch.to(self.torch_dtype)
        if self.mean is not None:
            batch = batch - self._per_channel(self.mean, batch)
        if self.std is not None:
            batch = batch / self._per_channel(self.std, batch)
        bad = _non_finite_samples(batch, first)
        if bad:
            limit = torch.finfo(batch.dtype).max
            raise NonFiniteError(
                f"input sample(s) {bad[:10]} overflow {self.dtype} once cast and normalised ((x - mean) / std): "
                f"expected values within +-{limit:.3g} after normalisation"
            )
        return batch

    def check_batch(self, raw: Any, first: int = 0) -> Tensor:
        """Return ``raw`` as a ``(N, *input_shape)`` tensor or raise ``ValueError`` naming expected vs got.

        ``first`` is the index of the batch's first sample among all inputs (named in errors).
        """
        batch = _as_tensor(raw)
        if batch.dtype.is_complex or batch.dtype == torch.bool:
            raise InputError(f"wrong input dtype: expected real numbers (float or int), got {batch.dtype}")
        if batch.dim() == 0:
            raise InputError(
                f"a 0-d input (one number, {batch.item()!r}) is not a sample: expected a batch (N, ...) "
                f"or one sample of shape {self._shape_text()}"
            )
        if self.input_shape is not None and batch.dim() == len(self.input_shape):
            batch = batch.unsqueeze(0)
        if batch.shape[0] == 0:
            raise InputError(f"empty input: expected at least one sample of shape {self._shape_text()}")
        self._check_shape(batch)
        bad = _non_finite_samples(batch, first)
        if bad:
            raise NonFiniteError(f"input contains NaN or inf values in sample(s) {bad[:10]}: expected finite numbers")
        return batch

    def _check_shape(self, batch: Tensor) -> None:
        if self.input_shape is None:
            return
        sample = tuple(batch.shape[1:])
        if sample == self.input_shape:
            return
        expected = self._shape_text()
        dims = ", ".join(str(d) for d in self.input_shape)
        if len(sample) == len(self.input_shape) == 3 and sample[1:] == self.input_shape[1:]:
            raise InputError(
                f"wrong channel count: expected {self.input_shape[0]} channel(s) (sample shape {expected}), "
                f"got {sample[0]} (sample shape {sample})"
            )
        raise InputError(
            f"wrong input shape: expected a batch (N, {dims}) or one sample {expected}, got {tuple(batch.shape)}"
        )

    def _shape_text(self) -> str:
        return str(self.input_shape) if self.input_shape is not None else "(any)"

    @staticmethod
    def _per_channel(values: tuple[float, ...], batch: Tensor) -> Tensor:
        tensor = torch.tensor(values, dtype=batch.dtype, device=batch.device)
        if len(values) == 1:
            return tensor
        if batch.dim() < 2 or batch.shape[1] != len(values):
            raise InputError(
                f"{len(values)} normalisation values need {len(values)} channels; got batch {tuple(batch.shape)}"
            )
        return tensor.view(1, -1, *([1] * (batch.dim() - 2)))

    # ----------------------------------------------------------------- regression targets
    def unscale_target(self, values: Tensor) -> Tensor:
        """Invert the target scaling: ``values * target_std + target_mean`` (per output column)."""
        if self.target_std is not None:
            values = values * torch.tensor(self.target_std, dtype=values.dtype, device=values.device)
        if self.target_mean is not None:
            values = values + torch.tensor(self.target_mean, dtype=values.dtype, device=values.device)
        return values


def _non_finite_samples(batch: Tensor, first: int) -> list[int]:
    """Indices (numbered from ``first``) of the samples of ``batch`` holding NaN or inf."""
    # A finite sum proves every element finite (NaN and inf propagate) at a tenth of isfinite's cost;
    # only a non-finite sum (or an overflowing one) needs the element-wise check.
    if not batch.is_floating_point() or bool(torch.isfinite(batch.sum())):
        return []
    finite = torch.isfinite(batch)
    if bool(finite.all()):
        return []
    return [first + i for i in (~finite).reshape(len(batch), -1).any(1).nonzero().flatten().tolist()]


# --------------------------------------------------------------------- loading raw inputs
def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        if value.layout != torch.strided:
            raise InputTypeError(f"expected a dense (strided) tensor; got a {value.layout} tensor (call .to_dense())")
        if value.is_meta:
            raise InputError(f"expected a tensor holding data; got a meta tensor of shape {tuple(value.shape)}")
        return value.detach()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise InputError(f"cannot read input as a numeric array: {error}") from None
    _check_numeric(array.dtype, "wrong input dtype")
    if not array.dtype.isnative:  # big-endian data on a little-endian machine: the same numbers, native order
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.uint16 or array.dtype == np.uint32:
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array)).reshape(array.shape)  # 0-d stays 0-d


def _check_numeric(dtype: np.dtype, what: str) -> None:
    """Refuse numpy dtypes that are not plain numbers torch holds (dates, strings, objects, long double)."""
    wider = dtype.kind == "f" and dtype.itemsize > 8 or dtype.kind == "c" and dtype.itemsize > 16
    if dtype.kind not in "biufc" or wider:
        raise InputError(
            f"{what}: expected real numbers, got numpy dtype {dtype} "
            "(trainfer reads int8..int64, uint8..uint64, float16..float64)"
        )


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
            batch = _as_tensor(item)
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
    if not path.is_file():
        raise MissingFileError(f"input file not found: {str(path)!r}")
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


def load_npy(path: Path, spec: PreprocessSpec) -> Tensor:
    """A ``.npy`` array (never pickled objects: ``allow_pickle=False``) as a raw batch."""
    return _as_tensor(read_npy(path, spec))


def read_npy(path: Path, spec: PreprocessSpec, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` file as a batch array ``(N, ...)`` (memory-mapped if ``mmap``), never unpickled.

    One sample of ``spec.input_shape`` gets its batch dimension. An empty, truncated or foreign
    file, a 0-d array and an array of 0 samples are errors naming the file and what was expected.
    """
    name = str(path)
    _check_npy_header(path, mmap)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"cannot read {name!r} as a .npy array: {error or 'truncated file'}") from None
    return npy_samples(array, name, spec)


def npy_samples(array: np.ndarray, name: str, spec: PreprocessSpec) -> np.ndarray:
    """``array`` (read from the ``.npy`` file ``name``) as a batch: numbers only, one sample of
    ``spec.input_shape`` gains its batch dimension; a 0-d array or no samples is an :class:`InputError`."""
    _check_numeric(array.dtype, f"cannot read {name!r}: wrong dtype")
    expected = f"a batch (N, {', '.join(map(str, spec.input_shape))}) or one sample" if spec.input_shape else "a batch"
    if array.ndim == 0:
        raise InputError(f"{name!r} holds a 0-d array (one number): expected {expected} of shape {spec._shape_text()}")
    if spec.input_shape is not None and array.ndim == len(spec.input_shape):
        array = array[None]
    if len(array) == 0:
        raise InputError(f"{name!r} holds no samples (shape {array.shape}): expected at least one")
    return array


def _check_npy_header(path: Path, mmap: bool) -> None:
    """Refuse a ``.npy`` file from its header alone: not ``.npy``, not numbers, or more data than it holds.

    Read into memory (not ``mmap``), it may hold at most :data:`MAX_NPY_ELEMENTS` elements.
    """
    name = str(path)
    with open(path, "rb") as handle:
        magic = handle.read(len(_NPY_MAGIC))
        if magic != _NPY_MAGIC:
            got = "an empty file (0 bytes)" if not magic else f"a file starting with {magic!r}"
            raise InputError(f"cannot read {name!r}: expected a .npy array (starting with {_NPY_MAGIC!r}), got {got}")
        version = tuple(handle.read(2))
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise InputError(f"cannot read {name!r} as a .npy array: format version {version}, expected (1, 0)/(2, 0)")
        try:
            shape, _, dtype = read_header[version](handle)
        except (ValueError, OSError, EOFError, SyntaxError) as error:
            raise InputError(f"cannot read {name!r} as a .npy array: {error or 'truncated header'}") from None
        if dtype.hasobject:
            raise InputError(
                f"cannot read {name!r} as a .npy array: it holds pickled Python objects, never loaded "
                "(allow_pickle=False): expected numbers"
            )
        _check_numeric(dtype, f"cannot read {name!r}: wrong dtype")
        elements = math.prod(shape)
        available = os.fstat(handle.fileno()).st_size - handle.tell()
    if elements * dtype.itemsize > available:
        raise InputError(
            f"{name!r} declares shape {shape} of {dtype} ({elements * dtype.itemsize} bytes) but holds "
            f"{available} bytes of data: a truncated or forged .npy file"
        )
    if not mmap and elements > MAX_NPY_ELEMENTS:
        raise InputError(
            f"{name!r} holds {elements} elements (shape {shape}): expected at most {MAX_NPY_ELEMENTS} "
            "(trainfer.serve.preprocess.MAX_NPY_ELEMENTS) for a file read into memory"
        )


def load_image(path: Path, spec: PreprocessSpec) -> Tensor:
    """An image file as a raw ``(C, H, W)`` float sample in ``[0, 1]`` (``pixel_scale`` times bytes).

    The channel count of ``spec.input_shape`` picks the mode (1: grayscale, 3: RGB or BGR, 4: RGBA);
    the image is resized (``spec.resample``, bilinear by default) to its height and width unless
    ``spec.resize`` is false.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            _check_pixels(image.width, image.height, path)
            image.load()
            return _image_to_tensor(image, spec, path)
    except InputError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit (twice its warning size), checked when opening
        raise InputError(_too_large(path, f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}")) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # ValueError: huge zTXt/iCCP chunks
        raise InputError(f"cannot read image {str(path)!r}: {error}") from None


def _check_pixels(width: int, height: int, path: Path) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(_too_large(path, f"{width}x{height} = {width * height}"))


def _too_large(path: Path, pixels: str) -> str:
    return (
        f"image {str(path)!r} claims {pixels} pixels: expected at most {MAX_IMAGE_PIXELS} "
        "(trainfer.serve.preprocess.MAX_IMAGE_PIXELS; larger images are refused as possible decompression bombs)"
    )


def _image_to_tensor(image: Any, spec: PreprocessSpec, path: Path) -> Tensor:
    from PIL import Image

    shape = spec.input_shape
    if shape is not None and len(shape) != 3:
        raise InputError(f"image {str(path)!r} given, but the model expects samples of shape {shape}, not (C, H, W)")
    channels = shape[0] if shape is not None else (1 if image.mode in ("L", "1", *_FULL_SCALE) else 3)
    if channels not in _IMAGE_MODES:
        raise InputError(f"images convert to 1, 3 or 4 channels; the model expects {channels} (shape {shape})")
    deep = image.mode in _FULL_SCALE
    image = _in_byte_units(image, path) if deep else image.convert(_IMAGE_MODES[channels])
    if shape is not None and (image.height, image.width) != shape[1:]:
        if not spec.resize:
            raise InputError(
                f"image {str(path)!r} is {image.height}x{image.width}, expected {shape[1]}x{shape[2]} (resize is off)"
            )
        image = image.resize((shape[2], shape[1]), getattr(Image.Resampling, spec.resample.upper()))
    if deep:  # gray in byte units: repeated over the colour channels, alpha opaque
        gray = np.asarray(image, dtype=np.float32)
        planes = [gray] * min(channels, 3) + ([np.full_like(gray, 255.0)] if channels == 4 else [])
        array = np.stack(planes, axis=2)
    else:
        array = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels)
    if channels == 3 and spec.channel_order == "BGR":
        array = array[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)) * spec.pixel_scale)


def _in_byte_units(image: Any, path: Path) -> Any:
    """A 16-bit or float single-channel image as a float (mode ``F``) image scaled to ``0..255``.

    ``convert("L")`` would clip (65535 -> 255, 0.5 -> 0); here ``v * 255 / full_scale``, with the
    full scale of the mode (65535 for 16 bits, 1.0 for floats). Values outside ``0..full_scale``
    are refused: their scale is unknown.
    """
    from PIL import Image

    full = _FULL_SCALE[image.mode]
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (0 <= low and high <= full):  # also false for NaN
        raise InputError(
            f"image {str(path)!r} (mode {image.mode}) holds values in [{low:g}, {high:g}]: "
            f"expected 0..{full:g} ({'16-bit' if full != 1.0 else 'float intensities'})"
        )
    return Image.fromarray((values * (255.0 / full)).astype(np.float32))


def iter_csv(path: Path, spec: PreprocessSpec, chunk_rows: int = _CSV_CHUNK_ROWS) -> Iterator[Tensor]:
    """Rows of a CSV file with a header, as raw ``(n, F)`` float64 chunks of at most ``chunk_rows``.

    ``spec.columns`` picks and orders the columns by name (a missing one is named in the error);
    without it every column is used in file order.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise InputError(f"CSV file {str(path)!r} is empty: expected a header row of column names")
            indices = _column_indices([h.strip() for h in header], spec, path)
            rows: list[list[float]] = []
            count = 0
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                rows.append(_parse_row(row, indices, header, path, line))
                count += 1
                if len(rows) == chunk_rows:
                    yield torch.tensor(rows, dtype=torch.float64)
                    rows = []
            if rows:
                yield torch.tensor(rows, dtype=torch.float64)
            if not count:
                raise InputError(
                    f"CSV file {str(path)!r} has a header but no data rows: expected at least one row of "
                    f"{len(header)} values"
                )
    except (UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read CSV file {str(path)!r}: {error}") from None


def _column_indices(header: list[str], spec: PreprocessSpec, path: Path) -> list[int]:
    """The position of each of ``spec.columns`` in ``header`` (its first occurrence), in linear time."""
    if spec.columns is None:
        return list(range(len(header)))
    positions: dict[str, int] = {}
    for index, name in enumerate(header):
        positions.setdefault(name, index)
    missing = [c for c in spec.columns if c not in positions]
    if missing:
        raise InputError(
            f"CSV file {str(path)!r} lacks column(s) {_some(missing)}: "
            f"expected {_some(spec.columns)}, got {_some(header)}"
        )
    return [positions[c] for c in spec.columns]


def _some(names: Iterable[str], shown: int = 10) -> str:
    """At most ``shown`` of ``names`` as a list, with how many more there are."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def _parse_row(row: list[str], indices: list[int], header: list[str], path: Path, line: int) -> list[float]:
    if len(row) != len(header):
        raise InputError(
            f"CSV file {str(path)!r} line {line}: expected {len(header)} values (one per header column), got {len(row)}"
        )
    values = []
    for i in indices:
        try:
            values.append(float(row[i]))
        except ValueError:
            raise InputError(
                f"CSV file {str(path)!r} line {line}, column {header[i]!r}: expected a number, got {row[i]!r}"
            ) from None
    return values


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
