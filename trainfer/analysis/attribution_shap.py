"""The sampling attribution methods Captum computes: Kernel SHAP and LIME over features
(:func:`feature_mask`), and DeepLIFT-SHAP over a reference batch (see :mod:`trainfer.analysis.attribution`;
GradientSHAP is computed in :mod:`~trainfer.analysis.attribution_gradient_shap`). Each takes Captum's
``captum.attr`` module, the explained function, the batch, the target and options.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.analysis.attribution_ig import INTEGRATED_GRADIENTS_ROWS
from trainfer.errors import InputError, InputTypeError
from trainfer.validate import check_integer

SAMPLE_BUDGET = {"kernel_shap": 200, "lime": 200, "gradient_shap": 20}
"""Default ``n_samples`` per sampling method."""

#: The most perturbed copies of each example run through the model at once by default (Captum's own
#: default is 1: one forward per coalition or window, 10x the CPU of 64 at a time on an 8x8 digit).
PERTURBATIONS_AT_ONCE = 64
#: The most input elements those default copies hold together (4 MiB of float32 before the model's
#: activations): one 224x224 RGB image takes 6 copies at once, a batch of them 1.
PERTURBED_ELEMENTS_AT_ONCE = 2**20
#: The most values Kernel SHAP's and LIME's surrogate is fitted to per example: ``n_samples`` times the
#: features (Captum's design matrix; with its weights and the fit's float64 copies about 30 bytes each,
#: so about 500 MB). It bounds the fit's work too: a least-squares fit of ``n`` samples and ``f``
#: features takes ``n f min(n, f)`` steps, at most ``2**36`` within this bound.
MAX_SURROGATE_ELEMENTS = 2**24
#: The most rows (an example against one reference) DeepLIFT-SHAP runs through the model at once:
#: integrated gradients' bound (:data:`~trainfer.analysis.attribution_ig.INTEGRATED_GRADIENTS_ROWS`).
DEEPLIFT_SHAP_ROWS = INTEGRATED_GRADIENTS_ROWS

__all__ = [
    "DEEPLIFT_SHAP_ROWS",
    "MAX_SURROGATE_ELEMENTS",
    "PERTURBATIONS_AT_ONCE",
    "PERTURBED_ELEMENTS_AT_ONCE",
    "SAMPLE_BUDGET",
    "deeplift_shap",
    "default_samples",
    "feature_mask",
    "fewest_samples",
    "kernel_shap",
    "lime",
    "perturbations_at_once",
    "surrogate_features",
]


def feature_mask(batch: Tensor, patch: int | None = None) -> Tensor:
    """Feature ids for KernelSHAP and LIME, shape ``(1, *batch.shape[1:])`` (shared by the batch).

    Images ``(N, C, H, W)`` and ``(N, H, W)``: square patches of side ``patch`` (default: a quarter
    of the shorter side, so about 16 features; at least 1, at most the shorter side), all channels
    of a patch one feature. Tables ``(N, F)``: one feature per column. Other shapes: one feature per
    element; ``patch`` is refused there.
    """
    sample = batch.shape[1:]
    if len(sample) in (2, 3):
        height, width = sample[-2:]
        default = max(1, min(height, width) // 4)
        side = default if patch is None else check_integer("patch", patch, minimum=1, maximum=min(height, width))
        rows, cols = torch.arange(height) // side, torch.arange(width) // side
        ids = rows[:, None] * ((width + side - 1) // side) + cols[None, :]
        return ids.expand(sample).reshape(1, *sample).to(batch.device)
    if patch is not None:
        raise InputError(f"patch= makes square features of images (C, H, W) or (H, W); the samples are {tuple(sample)}")
    return torch.arange(sample.numel(), device=batch.device).reshape(1, *sample)


def surrogate_features(mask: Tensor) -> int:
    """The features Captum's surrogate fits for the feature ``mask`` ``(1 or N, *sample)``: the widest span of
    ids of one example, greatest minus least plus one (Captum numbers them from the least id, used or not)."""
    return max(int(row.max()) - int(row.min()) + 1 for row in mask)


def fewest_samples(features: int) -> int:
    """The fewest ``n_samples`` Kernel SHAP and LIME fit a surrogate of ``features`` features with: one weight
    per feature and an intercept, and one sample more so that the fit has a residual. With fewer the fit is
    underdetermined: one sample gave all-zero attributions (not summing to ``f(x) - f(x0)``) and an R^2 of 1."""
    return features + 2


def default_samples(method: str, features: int) -> int:
    """``n_samples`` when none is given: :data:`SAMPLE_BUDGET`, or :func:`fewest_samples` when more."""
    return max(SAMPLE_BUDGET[method], fewest_samples(features))


def perturbations_at_once(batch: Tensor) -> int:
    """The default ``perturbations_per_eval`` for ``batch``: :data:`PERTURBATIONS_AT_ONCE`, fewer (at
    least 1) when the batch's copies would hold more than :data:`PERTURBED_ELEMENTS_AT_ONCE` elements.
    The copies are the same either way, drawn in the same order: only how many share a forward changes."""
    fitting = PERTURBED_ELEMENTS_AT_ONCE // max(1, batch.numel())
    return max(1, min(PERTURBATIONS_AT_ONCE, fitting))


def _sampling_settings(method: str, batch: Tensor, options: dict) -> tuple[dict, dict]:
    """Captum arguments (mask, budget, zero baselines, progress) with ``options`` on top; the patch option."""
    options = dict(options)
    mask = options.pop("feature_mask", None)
    if mask is None:
        mask = feature_mask(batch, options.pop("patch", None))
    settings = {
        "feature_mask": mask,
        "n_samples": default_samples(method, surrogate_features(mask)),
        "baselines": 0.0,
        "perturbations_per_eval": perturbations_at_once(batch),
        "show_progress": sys.stderr.isatty(),
    }
    return {**settings, **options}, {"feature_mask": mask}


def kernel_shap(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Any:
    settings, details = _sampling_settings("kernel_shap", batch, options)
    with torch.no_grad(), _one_fit_per_example():
        return attr.KernelShap(forward).attribute(batch, target=target, **settings), details


def lime(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Any:
    settings, details = _sampling_settings("lime", batch, options)
    surrogate = _recording_lasso(alpha=0.01)
    with torch.no_grad(), _one_fit_per_example():
        values = attr.Lime(forward, interpretable_model=surrogate).attribute(batch, target=target, **settings)
    return values, {**details, "surrogate_r2": list(surrogate.r2)}


@contextmanager
def _one_fit_per_example() -> Iterator[None]:
    """Silences Captum's warning that a batch fits one surrogate per example: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
        yield


def _recording_lasso(alpha: float) -> Any:
    """Captum's Lasso surrogate that also records, per fit, its weighted R^2 on the samples it was fitted to:
    NaN where the model's outputs on those samples do not vary (no variance to explain, R^2 undefined)."""
    from captum._utils.models.linear_model import SkLearnLasso

    class RecordingLasso(SkLearnLasso):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self.r2: list[float] = []

        def fit(self, train_data: Any, **kwargs: Any) -> Any:
            result = super().fit(train_data, **kwargs)
            x, y, w = (torch.cat(parts) for parts in zip(*train_data))
            with torch.no_grad():
                error = y.reshape(-1) - self(x).reshape(-1)
            mean = (w * y).sum() / w.sum()
            spread = (w * (y - mean) ** 2).sum()
            self.r2.append(float(1 - (w * error**2).sum() / spread) if spread > 0 else math.nan)
            return result

    return RecordingLasso(alpha=alpha)


def deeplift_shap(
    attr: ModuleType, model: Callable, batch: Tensor, target: Any, options: dict, rows_at_once: int = DEEPLIFT_SHAP_ROWS
) -> Tensor:
    """DeepLIFT-SHAP over ``options``' ``baselines``, by default the zero sample twice: the mean over the
    reference batch of DeepLIFT's attributions of each example against each reference, as Captum's
    ``DeepLiftShap`` computes it, but run in chunks of ``max(1, rows_at_once // N)`` references for the whole
    batch (Captum runs every pair at once: the batch times B copies of the model's activations), summed in
    order in float32 at least: the values do not depend on the chunks, up to rounding."""
    if not isinstance(model, nn.Module):
        raise InputTypeError("deeplift_shap needs the model as an nn.Module (its rules hook the model's modules)")
    references = options.get("baselines")
    if references is None:
        references = torch.zeros((2, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    deeplift = attr.DeepLift(model)
    total = torch.zeros_like(batch, dtype=torch.promote_types(batch.dtype, torch.float32))
    for chunk in references.split(max(1, rows_at_once // len(batch))):
        total += _summed_deeplift(deeplift, batch, target, chunk)
    return (total / len(references)).to(batch.dtype)


def _summed_deeplift(deeplift: Any, batch: Tensor, target: Tensor | None, references: Tensor) -> Tensor:
    """The sum over ``references`` of DeepLIFT's attributions of each example against each, every pair at once
    (row ``i * B + j``: example ``i`` against reference ``j``, in the order of Captum's ``DeepLiftShap``)."""
    count = len(references)
    inputs = batch.repeat_interleave(count, dim=0)
    baselines = references.repeat(len(batch), *(1,) * (batch.dim() - 1))
    targets = None if target is None else target.repeat_interleave(count)
    values = deeplift.attribute(inputs, baselines=baselines, target=targets)
    return values.reshape(len(batch), count, *batch.shape[1:]).sum(1)
