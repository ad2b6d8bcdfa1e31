"""The options each explanation method takes, checked before Captum runs (:func:`check_options`).

Every option is checked for its type, its range and, for tensors, its shape, and refused in one line
naming the option, what it expects and what it was given (:mod:`trainfer.validate`'s form:
:class:`~trainfer.errors.InputTypeError` for a wrong type, :class:`~trainfer.errors.InputError` for a
value out of range). Captum's own errors (an ``AssertionError`` printing whole tensors, a
``MemoryError``, a NaN distribution) never reach the caller, and the bounds keep an explanation's
work and memory finite:

- ``n_steps`` (integrated gradients) at most :data:`MAX_STEPS`; ``n_samples`` (Kernel SHAP, LIME,
  GradientSHAP) at most :data:`MAX_SAMPLES`; a reference batch at most :data:`MAX_BASELINES` samples;
- what a method runs through the model at once, rows times one sample's elements, at most
  :data:`MAX_ELEMENTS_AT_ONCE`: integrated gradients' ``internal_batch_size`` rows; the batch times
  ``n_samples`` (GradientSHAP's draws, its noise drawn at once; the rows then run through the model in
  chunks of :data:`~trainfer.analysis.attribution_gradient_shap.GRADIENT_SHAP_ROWS`) or times the
  reference batch (GradientSHAP, DeepLIFT-SHAP, whose pairs run in chunks of
  :data:`~trainfer.analysis.attribution_shap.DEEPLIFT_SHAP_ROWS`); the batch times a
  ``perturbations_per_eval`` given (occlusion, Kernel SHAP, LIME) at most :data:`MAX_PERTURBED_ELEMENTS`;
- Kernel SHAP's and LIME's surrogate: ``n_samples`` at least the features + 2, and ``n_samples`` times the
  features at most :data:`~trainfer.analysis.attribution_shap.MAX_SURROGATE_ELEMENTS`.

A caller that explains a batch in parts takes at most :func:`most_examples_at_once` examples per part,
so options valid for one example stay valid for the part, and gives each part its rows of the options
that hold one row per example (:func:`example_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainfer.analysis.attribution_shap import (
    MAX_SURROGATE_ELEMENTS,
    SAMPLE_BUDGET,
    default_samples,
    feature_mask,
    fewest_samples,
    surrogate_features,
)
from trainfer.errors import InputError, InputTypeError
from trainfer.validate import check_integer, check_keywords, check_number, check_type, given

#: The most points integrated gradients takes on the path (Captum's default is 50; papers use 20 to 300).
MAX_STEPS = 10_000
#: The most samples Kernel SHAP, LIME (coalitions) and GradientSHAP (draws) take: 50 times the default 200.
MAX_SAMPLES = 10_000
#: The most samples a reference batch (``baselines`` of GradientSHAP and DeepLIFT-SHAP) holds.
MAX_BASELINES = 1_000
#: The most input elements a method runs through the model at once (rows times one sample's elements):
#: 2**28, 1 GiB of float32 inputs, before the model's activations.
MAX_ELEMENTS_AT_ONCE = 2**28
#: The most input elements a ``perturbations_per_eval`` given runs through the model at once (the batch
#: times it times one sample's elements; 1 is always allowed): 2**22, 16 MiB of float32, four times the
#: default's :data:`~trainfer.analysis.attribution_shap.PERTURBED_ELEMENTS_AT_ONCE`. Each perturbed copy
#: holds a copy of the model's activations: 200 copies of a 3x128x128 image through two 32-channel
#: convolutions took 1.4 GB; this bound allows 85 of them.
MAX_PERTURBED_ELEMENTS = 2**22

#: The options each method takes (all keyword arguments of ``explain``/``attribute`` besides ``target``).
OPTIONS: dict[str, tuple[str, ...]] = {
    "integrated_gradients": ("n_steps", "internal_batch_size", "baselines"),
    "saliency": ("abs",),
    "occlusion": ("sliding_window_shapes", "strides", "baselines", "perturbations_per_eval", "show_progress"),
    "kernel_shap": ("n_samples", "feature_mask", "patch", "baselines", "perturbations_per_eval", "show_progress"),
    "lime": ("n_samples", "feature_mask", "patch", "baselines", "perturbations_per_eval", "show_progress"),
    "gradient_shap": ("n_samples", "stdevs", "baselines", "generator"),
    "deeplift_shap": ("baselines",),
}
#: The methods whose ``baselines`` are a reference batch, and the fewest samples it needs.
_REFERENCE_BATCH = {"gradient_shap": 1, "deeplift_shap": 2}

__all__ = [
    "MAX_BASELINES",
    "MAX_ELEMENTS_AT_ONCE",
    "MAX_PERTURBED_ELEMENTS",
    "MAX_SAMPLES",
    "MAX_STEPS",
    "OPTIONS",
    "check_options",
    "example_rows",
    "most_examples_at_once",
]


def check_options(method: str, batch: Tensor, options: dict[str, Any]) -> dict[str, Any]:
    """Refuse an option ``method`` does not take, or a value it cannot run with, for the preprocessed ``batch``.

    Returns the options as the methods take them (:data:`_CONVERSIONS`): a feature mask of any integer
    dtype as int64 (exact); ``stdevs`` (a numpy scalar, a one-element tensor) and one ``baselines`` number
    (a NumPy scalar, a 0-d array or tensor) as a ``float``.
    """
    check_keywords(f"explanation method {method!r}", options, OPTIONS[method])
    if "patch" in options and "feature_mask" in options:
        raise InputError("give feature_mask= or patch= (which makes square-patch features), not both")
    for name, value in options.items():
        _CHECKS[name](name, value, method, batch)
    options = {name: _CONVERSIONS[name](value) if name in _CONVERSIONS else value for name, value in options.items()}
    if method == "occlusion":
        _check_strides_fit(options, tuple(batch.shape[1:]))
    if method in ("kernel_shap", "lime"):
        _check_features(method, batch, options)
    return options


def most_examples_at_once(method: str, sample: tuple[int, ...], options: dict[str, Any]) -> int:
    """The most examples of shape ``sample`` one explanation by ``method`` with ``options`` may take (at
    least 1): the examples, times the rows the method runs through the model at once per example
    (``perturbations_per_eval``; GradientSHAP's ``n_samples`` or reference batch; DeepLIFT-SHAP's reference
    batch; else 1), times one sample's elements, stay within :data:`MAX_ELEMENTS_AT_ONCE` (within
    :data:`MAX_PERTURBED_ELEMENTS` where ``perturbations_per_eval`` is given). An option of
    the wrong kind counts as its default here: :func:`check_options` refuses it."""
    per_example = math.prod(sample) * _rows_per_example(method, options)
    return max(1, _elements_limit(method, options) // max(1, per_example))


def _elements_limit(method: str, options: dict[str, Any]) -> int:
    """The elements-at-once bound of ``method`` with ``options``: :data:`MAX_PERTURBED_ELEMENTS` where a valid
    ``perturbations_per_eval`` is given, else :data:`MAX_ELEMENTS_AT_ONCE`."""
    given_copies = method not in _REFERENCE_BATCH and _count(options.get("perturbations_per_eval"), 0)
    return MAX_PERTURBED_ELEMENTS if given_copies else MAX_ELEMENTS_AT_ONCE


def _rows_per_example(method: str, options: dict[str, Any]) -> int:
    reference = options.get("baselines")
    if method in _REFERENCE_BATCH:
        references = len(reference) if isinstance(reference, Tensor) and reference.dim() else 1
        if method == "deeplift_shap":
            return references if isinstance(reference, Tensor) else 2  # its default: two zero samples
        return max(_count(options.get("n_samples"), SAMPLE_BUDGET["gradient_shap"]), references)
    return _count(options.get("perturbations_per_eval"), 1)


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else default


def example_rows(method: str, options: dict[str, Any], batch: Tensor, start: int, stop: int) -> dict[str, Any]:
    """``options`` for examples ``start:stop`` of ``batch`` explained apart: a ``baselines`` or
    ``feature_mask`` tensor of one row per example (the batch's shape ``(N, *sample)``) keeps those
    examples' rows; everything else (one value or sample for all, a reference batch) is kept whole."""
    per_example = ("feature_mask",) if method in _REFERENCE_BATCH else ("feature_mask", "baselines")
    return {
        name: value[start:stop]
        if name in per_example and isinstance(value, Tensor) and value.shape == batch.shape
        else value
        for name, value in options.items()
    }


def occlusion_defaults(sample: tuple[int, ...]) -> dict[str, Any]:
    """Occlusion's window and strides: ``C x k x k`` windows (``k`` about an eighth of the image side),
    half-overlapping, for images ``(C, H, W)``; single elements otherwise."""
    if len(sample) == 3:
        side = max(1, round(min(sample[1:]) / 8))
        step = max(1, side // 2)
        return {"sliding_window_shapes": (sample[0], side, side), "strides": (sample[0], step, step)}
    return {"sliding_window_shapes": (1,) * len(sample), "strides": 1}


def _check_strides_fit(options: dict[str, Any], sample: tuple[int, ...]) -> None:
    """Captum's occlusion moves a window by its strides: a stride larger than the window skips elements."""
    settings = {**occlusion_defaults(sample), **options}
    window = _window("sliding_window_shapes", settings["sliding_window_shapes"], sample, scalar=False)
    strides = _window("strides", settings["strides"], sample)
    if any(s > w for s, w in zip(strides, window, strict=True)):
        raise InputError(f"strides must be at most the sliding window {window} in each dimension; got {strides}")


def _check_features(method: str, batch: Tensor, options: dict[str, Any]) -> None:
    """Kernel SHAP and LIME fit a surrogate of one weight per feature: check the features
    (:func:`_check_two_features`) and the samples they are fitted with (:func:`_check_surrogate_fit`)."""
    mask = options.get("feature_mask")
    if mask is None:
        mask = feature_mask(batch[:1], options.get("patch"))
    _check_two_features(method, mask)
    features = surrogate_features(mask)
    _check_surrogate_fit(method, features, options.get("n_samples", default_samples(method, features)))


def _check_two_features(method: str, mask: Tensor) -> None:
    """Kernel SHAP and LIME weigh features against each other: one feature (a mask of one id, a patch the
    size of the image, a table of one column) leaves Kernel SHAP no coalition to sample (Captum's NaN
    distribution) and LIME nothing to fit."""
    fewest = min(int(row.unique().numel()) for row in mask)
    if fewest < 2:
        raise InputError(
            f"{method} needs at least 2 features to weigh against each other; the feature mask gives {fewest} "
            "(feature_mask= of one id, patch= the image's side, or a sample of one element): pass a smaller "
            "patch= or a mask of 2 or more ids"
        )


def _check_surrogate_fit(method: str, features: int, samples: int) -> None:
    """At least :func:`~trainfer.analysis.attribution_shap.fewest_samples` (else the fit is underdetermined),
    and ``samples x features`` at most :data:`~trainfer.analysis.attribution_shap.MAX_SURROGATE_ELEMENTS`."""
    needed, fewer = fewest_samples(features), "fewer features (a larger patch=, a mask of fewer ids)"
    if needed > MAX_SAMPLES:
        raise InputError(
            f"{method} needs n_samples of at least features + 2 = {needed} for the {features} features, more "
            f"than the most, {MAX_SAMPLES}: pass {fewer}"
        )
    if samples < needed:
        raise InputError(
            f"{method} fits one weight per feature and an intercept: n_samples must be at least features + 2 = "
            f"{needed} for the {features} features; got {samples}: pass n_samples={needed} or more, or {fewer}"
        )
    if samples * features > MAX_SURROGATE_ELEMENTS:
        raise InputError(
            f"{method} fits its surrogate to n_samples x features = {samples} x {features} = "
            f"{samples * features:,} values, at most {MAX_SURROGATE_ELEMENTS:,} (MAX_SURROGATE_ELEMENTS): "
            f"pass {fewer} or a smaller n_samples="
        )


def _rows_at_once(name: str, value: Any, batch: Tensor, per_row: int, limit: int = MAX_ELEMENTS_AT_ONCE) -> int:
    """An integer >= 1 whose rows of ``per_row`` samples keep the elements at once within ``limit``."""
    most = max(1, limit // max(1, per_row * math.prod(batch.shape[1:])))
    return check_integer(name, value, minimum=1, maximum=most)


def _n_steps(name: str, value: Any, method: str, batch: Tensor) -> None:
    check_integer(name, value, minimum=1, maximum=MAX_STEPS)


def _n_samples(name: str, value: Any, method: str, batch: Tensor) -> None:
    check_integer(name, value, minimum=1, maximum=MAX_SAMPLES)
    if method == "gradient_shap":  # drawn at once (the noise: the batch times n_samples samples)
        _rows_at_once(name, value, batch, len(batch))


def _internal_batch_size(name: str, value: Any, method: str, batch: Tensor) -> None:
    _rows_at_once(name, value, batch, 1)


def _perturbations_per_eval(name: str, value: Any, method: str, batch: Tensor) -> None:
    _rows_at_once(name, value, batch, len(batch), MAX_PERTURBED_ELEMENTS)


def _flag(name: str, value: Any, method: str, batch: Tensor) -> None:
    check_type(name, value, bool, "True or False")


def _stdevs(name: str, value: Any, method: str, batch: Tensor) -> None:
    check_number(name, value, low=0.0, high=math.inf)


def _generator(name: str, value: Any, method: str, batch: Tensor) -> None:
    """A ``torch.Generator`` on the inputs' device, which GradientSHAP draws from (its own, not torch's default)."""
    if not isinstance(value, torch.Generator):
        raise InputTypeError(f"{name} must be a torch.Generator on {batch.device}; got {given(value)}")
    if value.device != batch.device:
        raise InputError(
            f"{name} must be a torch.Generator on {batch.device}, as the inputs are; got one on {value.device}"
        )


def _patch(name: str, value: Any, method: str, batch: Tensor) -> None:
    feature_mask(batch[:1], value)  # its own check: an image's side, at most the shorter one


def _feature_mask(name: str, value: Any, method: str, batch: Tensor) -> None:
    """Integer feature ids per element, shared by the batch ``(1, *sample)`` or one per example ``(N, *sample)``."""
    sample = tuple(batch.shape[1:])
    expected = f"an integer tensor of shape {(1, *sample)} or {(len(batch), *sample)}"
    if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise InputTypeError(f"{name} must be {expected}; got {_described(value)}")
    if tuple(value.shape) not in ((1, *sample), (len(batch), *sample)):
        raise InputError(f"{name} must be {expected}; got shape {tuple(value.shape)}")
    _check_like_inputs(name, value, batch, same_dtype=False)
    elements = math.prod(batch.shape[1:])
    low, high = _id_range(value)
    if low < 0 or high >= elements:
        raise InputError(f"{name} must hold feature ids in [0, {elements - 1}]; got ids from {low} to {high}")


def _id_range(mask: Tensor) -> tuple[int, int]:
    """The least and greatest id of an integer ``mask`` ((0, 0) when empty), whatever its integer dtype.

    Read as int64, which torch's ``min``/``max`` take for every dtype: exact, but for uint64 ids of
    2**63 and above, which wrap negative and are read back here as the unsigned values they are.
    """
    ids = mask.to(torch.int64)
    if not ids.numel():
        return 0, 0
    if mask.dtype != torch.uint64 or int(ids.min()) >= 0:
        return int(ids.min()), int(ids.max())
    wrapped, unwrapped = ids[ids < 0], ids[ids >= 0]
    low = int(unwrapped.min()) if unwrapped.numel() else int(wrapped.min()) + 2**64
    return low, int(wrapped.max()) + 2**64


def _window(name: str, value: Any, sample: tuple[int, ...], scalar: bool = True) -> tuple[int, ...]:
    """A tuple of one int per sample dimension (or, where ``scalar``, one int for all), each in ``[1, that size]``."""
    sizes = (value,) * len(sample) if scalar and isinstance(value, int) and not isinstance(value, bool) else value
    expected = f"{'an int or ' if scalar else ''}a tuple of {len(sample)} ints, each in [1, the sample's size {sample}]"
    if not isinstance(sizes, tuple) or len(sizes) != len(sample):
        raise InputTypeError(f"{name} must be {expected}; got {given(value)}")
    for size, limit in zip(sizes, sample, strict=True):
        check_integer(f"each of {name}", size, minimum=1, maximum=limit)
    return sizes


def _sliding_window_shapes(name: str, value: Any, method: str, batch: Tensor) -> None:
    _window(name, value, tuple(batch.shape[1:]), scalar=False)


def _strides(name: str, value: Any, method: str, batch: Tensor) -> None:
    _window(name, value, tuple(batch.shape[1:]))


def _baselines(name: str, value: Any, method: str, batch: Tensor) -> None:
    """A finite number or a tensor of samples; for GradientSHAP and DeepLIFT-SHAP a reference batch."""
    sample, fewest = tuple(batch.shape[1:]), _REFERENCE_BATCH.get(method)
    if fewest is not None:
        shape = f"(B, *{sample}) with B in [{fewest}, {MAX_BASELINES}]"
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise InputTypeError(
                f"{name} of {method} must be a float tensor, a reference batch {shape}; got {_described(value)}"
            )
        if tuple(value.shape[1:]) != sample or not fewest <= len(value) <= MAX_BASELINES:
            raise InputError(f"{name} of {method} must be a reference batch {shape}; got shape {tuple(value.shape)}")
        _rows_at_once(f"the number of {name}", len(value), batch, len(batch))
    elif not isinstance(value, Tensor) or value.dim() == 0:
        _baseline_number(name, value)
        return
    else:
        allowed = [sample, (1, *sample), (len(batch), *sample)]
        if not value.is_floating_point() or tuple(value.shape) not in allowed:
            shapes = " or ".join(str(shape) for shape in allowed)
            raise InputError(
                f"{name} must be a finite number or a float tensor of shape {shapes}; got {_described(value)}"
            )
    _check_like_inputs(name, value, batch)
    if not bool(torch.isfinite(value).all()):
        raise InputError(f"{name} must be finite; got NaN or inf")


def _baseline_number(name: str, value: Any) -> None:
    """One baseline for every element: a finite real number (:func:`_real_number`)."""
    number = _real_number(value)
    if number is None:
        raise InputTypeError(f"{name} must be a finite number or a float tensor of samples; got {_described(value)}")
    if not math.isfinite(number):
        raise InputError(f"{name} must be finite; got {number!r}")


def _real_number(value: Any) -> float | None:
    """``value`` as a ``float`` when it is one real number: a Python, NumPy or 0-d array or tensor
    integer or float (``bool`` and complex are not); else None (so is a tensor holding no value, on ``meta``)."""
    if isinstance(value, Tensor):
        real = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex() and not value.is_meta
    else:
        real = not isinstance(value, bool) and np.ndim(value) == 0 and np.asarray(value).dtype.kind in "iuf"
    return float(value) if real else None


def _baseline_value(value: Any) -> Any:
    """A checked ``baselines`` as the methods take it: a tensor of samples as it is, one number as a ``float``."""
    return value if isinstance(value, Tensor) and value.dim() else float(value)


def _check_like_inputs(name: str, value: Tensor, batch: Tensor, same_dtype: bool = True) -> None:
    """A tensor option the method combines with the inputs: dense, on their device and (``same_dtype``) of their dtype.

    Refused, not cast: a float64 baseline may hold values the inputs' float32 cannot, and a meta or
    sparse tensor holds no values to cast (``.to(dtype)``, ``.to(device)`` or ``.to_dense()`` is the fix).
    """
    dtype = f"{str(batch.dtype).removeprefix('torch.')} " if same_dtype else ""
    if value.layout != torch.strided or value.device != batch.device or (same_dtype and value.dtype != batch.dtype):
        layout = "" if value.layout == torch.strided else f"{str(value.layout).removeprefix('torch.')} "
        found = f"a {layout}{str(value.dtype).removeprefix('torch.')} tensor on {value.device}"
        raise InputTypeError(f"{name} must be a dense {dtype}tensor on {batch.device}, as the inputs are; got {found}")


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return given(value)


#: The checked options the methods need in another type, and the conversion to it: Captum indexes with
#: the feature mask (int8, int16 and uint8 indices mean other things to torch), takes one ``baselines``
#: number only as an ``int`` or ``float`` (not ``np.float32``), and GradientSHAP scales its noise by
#: ``stdevs`` as a plain ``float`` (from a 0-d tensor or NumPy scalar, whatever its dtype).
_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "feature_mask": lambda mask: mask.to(torch.int64),
    "stdevs": float,
    "baselines": _baseline_value,
}

_CHECKS: dict[str, Callable[[str, Any, str, Tensor], None]] = {
    "n_steps": _n_steps,
    "n_samples": _n_samples,
    "internal_batch_size": _internal_batch_size,
    "perturbations_per_eval": _perturbations_per_eval,
    "abs": _flag,
    "show_progress": _flag,
    "stdevs": _stdevs,
    "patch": _patch,
    "feature_mask": _feature_mask,
    "sliding_window_shapes": _sliding_window_shapes,
    "strides": _strides,
    "baselines": _baselines,
    "generator": _generator,
}
