"""GradientSHAP, computed with torch's random generator (:func:`gradient_shap`).

``E[(x~ - b) * grad f(b + a (x~ - b))]`` over ``n_samples`` draws per example of a baseline ``b`` from
the reference batch, a point ``a ~ U(0, 1)`` on the path and, with ``stdevs`` > 0, Gaussian noise
``x~ = x + N(0, stdevs**2)`` (Captum's ``GradientShap``: its ``NoiseTunnel`` adds the noise, and
``InputBaselineXGradient`` takes the gradient at ``a x~ + (1 - a) b``). Captum draws the baselines and
the points from NumPy's global generator, so ``torch.manual_seed`` alone did not repeat an explanation
and threads explaining at once shared NumPy's state; here every draw comes from torch's default
generator of the batch's device (:func:`draws`), and NumPy's is never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainfer.analysis.attribution_ig import picked
from trainfer.analysis.attribution_shap import SAMPLE_BUDGET

__all__ = ["Draws", "draws", "gradient_shap", "gradient_shap_of"]


@dataclass(frozen=True)
class Draws:
    """GradientSHAP's random draws for ``N`` examples of ``n_samples`` rows each, row ``i * n_samples + s``
    the ``s``-th of example ``i``: the reference batch's row (``baselines``, ``(rows,)`` int64), the point
    on the path (``points``, ``(rows,)`` in the batch's dtype) and the noise added to the example
    (``noise``, the rows' shape, or None without noise)."""

    baselines: Tensor
    points: Tensor
    noise: Tensor | None


def draws(batch: Tensor, references: int, n_samples: int, stdevs: float) -> Draws:
    """``n_samples`` draws for each example of ``batch`` from torch's default generator of its device:
    baseline rows uniform among ``references``, points uniform in ``[0, 1)``, then noise of standard
    deviation ``stdevs`` (none drawn when it is 0)."""
    rows, device = len(batch) * n_samples, batch.device
    baselines = torch.randint(references, (rows,), device=device)
    points = torch.rand(rows, dtype=batch.dtype, device=device)
    noise = None
    if stdevs:
        noise = torch.randn((rows, *batch.shape[1:]), dtype=batch.dtype, device=device) * stdevs
    return Draws(baselines, points, noise)


def gradient_shap(
    attr: Any, forward: Callable[[Tensor], Tensor], batch: Tensor, target: Tensor | None, options: dict
) -> Tensor:
    """GradientSHAP of ``forward``'s ``target`` score for ``batch``: ``options`` ``n_samples`` (default
    :data:`~trainfer.analysis.attribution_shap.SAMPLE_BUDGET`), ``stdevs`` (default 0) and ``baselines``
    (a reference batch ``(B, *sample)``; default one zero sample), checked before. ``attr`` (Captum's
    module) is unused: the signature is every method's."""
    n_samples = options.get("n_samples", SAMPLE_BUDGET["gradient_shap"])
    references = options.get("baselines")
    if references is None:
        references = torch.zeros((1, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    found = draws(batch, len(references), n_samples, options.get("stdevs", 0.0))
    return gradient_shap_of(forward, batch, target, references, found)


def gradient_shap_of(
    forward: Callable[[Tensor], Tensor], batch: Tensor, target: Tensor | None, references: Tensor, found: Draws
) -> Tensor:
    """The mean over each example's rows of ``(x~ - b) * grad f(a x~ + (1 - a) b)`` for the draws ``found``,
    every row through the model at once (the option checks bound the rows times a sample's elements)."""
    n_samples = len(found.points) // len(batch)
    noisy = batch.repeat_interleave(n_samples, dim=0)
    if found.noise is not None:
        noisy = noisy + found.noise
    chosen = references[found.baselines]
    along = found.points.reshape(-1, *(1,) * (batch.dim() - 1))
    rows = (along * noisy + (1 - along) * chosen).requires_grad_()
    scores = picked(forward(rows), None if target is None else target.repeat_interleave(n_samples))
    (gradients,) = torch.autograd.grad(scores.sum(), rows)
    values = (noisy - chosen) * gradients
    return values.reshape(len(batch), n_samples, *batch.shape[1:]).sum(1) / n_samples
