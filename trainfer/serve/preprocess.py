"""What a model expects as input (:class:`PreprocessSpec`), and how a raw batch becomes that.

Files are read by :mod:`trainfer.serve.readers` (images, CSV, ``.npy``) and inputs of any accepted form
turned into raw batches by :mod:`trainfer.serve.inputs`.

A :class:`PreprocessSpec` is the preprocessing a model was trained with, stored in the bundle
manifest so serving repeats it exactly. Every input goes through two stages:

1. **load** — files and array-likes become a *raw* batch ``(N, *input_shape)``. Images are
   converted to the channel count of ``input_shape`` (grayscale ``L``, ``RGB``, optionally ``BGR``),
   resized to its height and width, and scaled by ``pixel_scale`` (``1/255``: bytes to ``[0, 1]``);
   16-bit images (PIL modes ``I;16*`` and ``I``, values ``0..65535``) are first scaled by
   ``255/65535`` and float images (mode ``F``, values in ``[0, 1]``) by ``255``, so that every
   bit depth of one picture gives the same sample; images over :data:`trainfer.serve.readers.MAX_IMAGE_PIXELS`
   pixels, or :data:`~trainfer.serve.readers.MAX_IMAGE_DECODE_BYTES` to decode, are refused before
   decoding. CSV files give one sample per row, with the ``columns`` picked by name; arrays and
   tensors are taken as they are (a single sample without its batch dimension gets one).
2. **prepare** — the raw batch is validated (non-empty, numeric, the expected shape, finite) and
   normalised: ``x' = (x - mean) / std`` per channel (dimension 1 of the batch), cast to ``dtype``;
   ``x'`` is checked finite again (``1e300`` is finite as float64, inf as float32).

Regression targets scaled for training as ``t' = (t - target_mean) / target_std`` are mapped back
by :meth:`PreprocessSpec.unscale_target`: ``t = t' * target_std + target_mean``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError, InputTypeError, NonFiniteError
from trainfer.integers import as_signed
from trainfer.numerics import all_finite_array, numpy_view

__all__ = ["PreprocessSpec", "as_tensor", "check_numeric"]


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
                "input sample(s) ",
                bad,
                f" overflow {self.dtype} once cast and normalised ((x - mean) / std): "
                f"expected values within +-{limit:.3g} after normalisation",
            )
        return batch

    def check_batch(self, raw: Any, first: int = 0) -> Tensor:
        """Return ``raw`` as a ``(N, *input_shape)`` tensor or raise ``ValueError`` naming expected vs got.

        ``first`` is the index of the batch's first sample among all inputs (named in errors).
        """
        plain = self._plain_batch(raw)
        if plain is not None:
            return plain
        batch = as_tensor(raw)
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
        if not batch.is_floating_point():
            self._warn_unscaled_pixels(batch)
        bad = _non_finite_samples(batch, first)
        if bad:
            raise NonFiniteError("input contains NaN or inf values in sample(s) ", bad, ": expected finite numbers")
        return batch

    def _warn_unscaled_pixels(self, batch: Tensor) -> None:
        """Warn (``UserWarning``, once per process and spec: the text is constant) when an integer ``batch``
        holds values above ``255 * pixel_scale`` although the model was trained on scaled pixels: an image
        model (``input_shape`` ``(C, H, W)``) whose recorded ``mean`` lies in ``[0, 255 * pixel_scale]`` and
        ``std`` at most half that, which data beyond that range cannot give. Tensors are never scaled (only
        image files are), so such a batch is raw bytes and the answers are wrong. A model without recorded
        normalisation, or trained on larger values (a mean or std beyond the range), is never warned about."""
        top = 255 * self.pixel_scale
        if self.input_shape is None or len(self.input_shape) != 3 or self.mean is None or self.std is None:
            return
        if not (all(0 <= m <= top for m in self.mean) and all(s <= top / 2 for s in self.std)):
            return
        if float(batch.max()) > top:
            warnings.warn(
                f"integer input with values above {top:.6g}, but this model was trained on pixels scaled by "
                f"pixel_scale {self.pixel_scale:.6g} (its recorded mean and std lie within [0, {top:.6g}]): tensors "
                f"and arrays are not scaled, only image files are, so its answers will be wrong. Pass float pixels "
                f"times {self.pixel_scale:.6g}, or the image files (warned once)",
                UserWarning,
                stacklevel=2,
            )

    def _plain_batch(self, raw: Any) -> Tensor | None:
        """``raw`` as a tensor when it plainly passes :meth:`check_batch` (a C-contiguous float32 or
        float64 NumPy array of ``(N >= 1, *input_shape)`` holding no NaN or inf:
        a protocol request's tensor), else None: the full checks then run and name what is wrong.
        Serving's hot path: the same answer for a tenth of the checks' cost."""
        if (
            type(raw) is not np.ndarray
            or raw.dtype not in _PLAIN_DTYPES
            or raw.shape[1:] != self.input_shape
            or not raw.shape[0]
            or not raw.flags.c_contiguous
        ):
            return None
        return torch.from_numpy(raw) if all_finite_array(raw) else None

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
    if not batch.is_floating_point() or _surely_finite(batch):
        return []
    finite = torch.isfinite(batch)
    if bool(finite.all()):
        return []
    return [first + i for i in (~finite).reshape(len(batch), -1).any(1).nonzero().flatten().tolist()]


_PLAIN_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})  # native byte order


def _surely_finite(batch: Tensor) -> bool:
    """True when ``batch`` is cheaply shown to hold no NaN or inf (False: look element by element).

    NumPy's exact test on a CPU tensor it can view (a request's few samples: a tenth of torch's
    per-call cost); elsewhere a finite sum, which proves every element finite at a tenth of
    ``torch.isfinite``'s cost (NaN and inf propagate; a sum that overflows only calls for the look).
    """
    array = numpy_view(batch)
    return all_finite_array(array) if array is not None else bool(torch.isfinite(batch.sum()))


def as_tensor(value: Any) -> Tensor:
    """An array-like (tensor, array, nested lists) as a dense CPU-readable tensor of plain numbers."""
    if isinstance(value, Tensor):
        if value.layout != torch.strided:
            raise InputTypeError(f"expected a dense (strided) tensor; got a {value.layout} tensor (call .to_dense())")
        if value.is_meta:
            raise InputError(f"expected a tensor holding data; got a meta tensor of shape {tuple(value.shape)}")
        if value.is_quantized:  # torch's own operations on it fail with a plain RuntimeError
            raise InputTypeError(
                f"expected a tensor of plain numbers; got a quantized {value.dtype} tensor (call .dequantize())"
            )
        return as_signed(value.detach())
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise InputError(f"cannot read input as a numeric array: {error}") from None
    check_numeric(array.dtype, "wrong input dtype")
    if not array.dtype.isnative:  # big-endian data on a little-endian machine: the same numbers, native order
        array = array.astype(array.dtype.newbyteorder("="))
    tensor = as_signed(torch.from_numpy(np.ascontiguousarray(array)))
    return tensor.reshape(()) if array.ndim == 0 else tensor  # ascontiguousarray makes a 0-d array 1-d


def check_numeric(dtype: np.dtype, what: str) -> None:
    """Refuse numpy dtypes that are not plain numbers torch holds (dates, strings, objects, long double)."""
    wider = dtype.kind == "f" and dtype.itemsize > 8 or dtype.kind == "c" and dtype.itemsize > 16
    if dtype.kind not in "biufc" or wider:
        raise InputError(
            f"{what}: expected real numbers, got numpy dtype {dtype} "
            "(trainfer reads int8..int64, uint8..uint64, float16..float64)"
        )
