"""GradientSHAP, computed with torch's random generator (:func:`gradient_shap`).

``E[(x~ - b) * grad f(b + a (x~ - b))]`` over ``n_samples`` draws per example of a baseline ``b`` from
the reference batch, a point ``a ~ U(0, 1)`` on the path and, with ``stdevs`` > 0, Gaussian noise
``x~ = x + N(0, stdevs**2)`` (Captum's ``GradientShap``: its ``NoiseTunnel`` adds the noise, and
``InputBaselineXGradient`` takes the gradient at ``a x~ + (1 - a) b``). Captum draws the baselines and
the points from NumPy's global generator, so ``torch.manual_seed`` alone did not repeat an explanation
and threads explaining at once shared NumPy's state; here every draw comes from torch's default
generator of the batch's device (:func:`draws`), or from the ``generator`` the caller passes, and NumPy's is
never touched. torch's default generator is shared by every thread: threads explaining at once each draw
part of the others' draws, so each gets values it would not get alone; a ``generator`` of its own (seeded
as wanted) gives each the values it gets alone. The draws are made at
once (the same draws however the rows run); the rows go through the model in chunks of whole draws of
every example, at most :data:`GRADIENT_SHAP_ROWS` rows (at least one draw of the whole batch), as
integrated gradients' path does, so an explanation holds a few samples' activations, not ``n_samples``
of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainfer.analysis.attribution_ig import INTEGRATED_GRADIENTS_ROWS, picked
from trainfer.analysis.attribution_shap import SAMPLE_BUDGET

#: The most rows GradientSHAP runs through the model at once (forward and backward): integrated
#: gradients' bound (:data:`~trainfer.analysis.attribution_ig.INTEGRATED_GRADIENTS_ROWS`).
GRADIENT_SHAP_ROWS = INTEGRATED_GRADIENTS_ROWS

__all__ = ["GRADIENT_SHAP_ROWS", "Draws", "draws", "gradient_shap", "gradient_shap_of"]


@dataclass(frozen=True)
class Draws:
    """GradientSHAP's random draws for ``N`` examples of ``n_samples`` rows each, row ``i * n_samples + s``
    the ``s``-th of example ``i``: the reference batch's row (``baselines``, ``(rows,)`` int64), the point
    on the path (``points``, ``(rows,)`` in the batch's dtype) and the noise added to the example
    (``noise``, the rows' shape, or None without noise)."""

    baselines: Tensor
    points: Tensor
    noise: Tensor | None


def draws(
    batch: Tensor, references: int, n_samples: int, stdevs: float, generator: torch.Generator | None = None
) -> Draws:
    """``n_samples`` draws for each example of ``batch`` from ``generator`` (None: torch's default generator of
    the batch's device): baseline rows uniform among ``references``, points uniform in ``[0, 1)``, then noise of
    standard deviation ``stdevs`` (none drawn when it is 0)."""
    rows, device = len(batch) * n_samples, batch.device
    baselines = torch.randint(references, (rows,), device=device, generator=generator)
    points = torch.rand(rows, dtype=batch.dtype, device=device, generator=generator)
    noise = None
    if stdevs:
        noise = torch.randn((rows, *batch.shape[1:]), dtype=batch.dtype, device=device, generator=generator) * stdevs
    return Draws(baselines, points, noise)


def gradient_shap(
    attr: Any, forward: Callable[[Tensor], Tensor], batch: Tensor, target: Tensor | None, options: dict
) -> Tensor:
    """GradientSHAP of ``forward``'s ``target`` score for ``batch``: ``options`` ``n_samples`` (default
    :data:`~trainfer.analysis.attribution_shap.SAMPLE_BUDGET`), ``stdevs`` (default 0), ``baselines``
    (a reference batch ``(B, *sample)``; default one zero sample) and ``generator`` (a ``torch.Generator`` on
    the batch's device to draw from; default torch's, shared by every thread), checked before. ``attr`` (Captum's
    module) is unused: the signature is every method's."""
    n_samples = options.get("n_samples", SAMPLE_BUDGET["gradient_shap"])
    references = options.get("baselines")
    if references is None:
        references = torch.zeros((1, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
    found = draws(batch, len(references), n_samples, options.get("stdevs", 0.0), options.get("generator"))
    return gradient_shap_of(forward, batch, target, references, found)


def gradient_shap_of(
    forward: Callable[[Tensor], Tensor],
    batch: Tensor,
    target: Tensor | None,
    references: Tensor,
    found: Draws,
    rows_at_once: int = GRADIENT_SHAP_ROWS,
) -> Tensor:
    """The mean over each example's rows of ``(x~ - b) * grad f(a x~ + (1 - a) b)`` for the draws ``found``,
    run in chunks of ``max(1, rows_at_once // N)`` whole draws of every example, summed in order in
    float32 at least (the values do not depend on the chunks, up to rounding)."""
    n_samples = len(found.points) // len(batch)
    draws_at_once = max(1, rows_at_once // len(batch))
    total = torch.zeros_like(batch, dtype=torch.promote_types(batch.dtype, torch.float32))
    for first in range(0, n_samples, draws_at_once):
        chunk = _chunk(found, len(batch), slice(first, first + draws_at_once))
        total += _summed_values(forward, batch, target, references, chunk)
    return (total / n_samples).to(batch.dtype)


def _chunk(found: Draws, examples: int, draws_taken: slice) -> Draws:
    """The draws ``draws_taken`` of each of ``examples`` examples, ordered as :class:`Draws` orders them."""

    def part(values: Tensor) -> Tensor:
        return values.reshape(examples, -1, *values.shape[1:])[:, draws_taken].reshape(-1, *values.shape[1:])

    return Draws(part(found.baselines), part(found.points), None if found.noise is None else part(found.noise))


def _summed_values(
    forward: Callable[[Tensor], Tensor], batch: Tensor, target: Tensor | None, references: Tensor, found: Draws
) -> Tensor:
    """The sum over each example's rows of ``(x~ - b) * grad f(a x~ + (1 - a) b)``, every row at once."""
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
    return values.reshape(len(batch), n_samples, *batch.shape[1:]).sum(1)
