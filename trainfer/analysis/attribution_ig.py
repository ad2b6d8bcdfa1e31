"""Integrated gradients, computed in chunks of the path with the Gauss-Legendre rule (:func:`integrated_gradients`).

``(x - x0) * integral over a in [0, 1] of grad f(x0 + a (x - x0))``, the integral by the ``n_steps``-point
Gauss-Legendre rule: Captum's ``IntegratedGradients`` with its default ``method="gausslegendre"``
(the same points, weights, chunks and convergence delta), computed here because Captum takes the
rule from NumPy's ``leggauss``, which finds the points as the eigenvalues of a dense
``n_steps x n_steps`` matrix, twice per call: O(n_steps**3), 20 s of CPU at 3200 steps and minutes at
:data:`~trainfer.analysis.attribution_options.MAX_STEPS`, where the model's passes take seconds.
:func:`path_rule` takes it from SciPy's ``roots_legendre`` (a banded eigenproblem, O(n_steps**2) with a
small constant: 0.2 s at 3200 steps, 1.8 s at 10000), once per ``n_steps`` per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: The most rows integrated gradients runs through the model at once (forward and backward): its
#: ``n_steps`` points of the path (50 by default) for each example go in chunks of whole steps of
#: at most this many rows (at least one step of the whole batch), so an explanation holds a few
#: samples' activations, not ``n_steps`` of them. ``internal_batch_size=`` overrides it.
INTEGRATED_GRADIENTS_ROWS = 8
#: Captum's default number of points on the path.
DEFAULT_STEPS = 50

__all__ = ["DEFAULT_STEPS", "INTEGRATED_GRADIENTS_ROWS", "integrated_gradients", "path_rule", "picked"]


@functools.lru_cache(maxsize=8)
def path_rule(n_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``n_steps``-point Gauss-Legendre rule on [0, 1]: points ``a`` in increasing order and their weights.

    Captum's (``0.5 * (1 + x)`` and ``0.5 * w`` for NumPy's ``leggauss`` on [-1, 1]), from SciPy's
    ``roots_legendre``, which agrees with ``leggauss`` within 1e-13.
    """
    from scipy.special import roots_legendre

    points, weights = roots_legendre(n_steps)
    return tuple(0.5 * (1 + points)), tuple(0.5 * weights)


def picked(scores: Tensor, target: Tensor | None) -> Tensor:
    """Each row's explained score: the ``target`` column of ``(N, C)`` scores, or ``(N,)`` scores themselves."""
    return scores if target is None else scores.gather(1, target[:, None])[:, 0]


def integrated_gradients(
    attr: Any, forward: Callable[[Tensor], Tensor], batch: Tensor, target: Tensor | None, options: dict
) -> tuple[Tensor, dict[str, Any]]:
    """Integrated gradients of ``forward``'s ``target`` score for ``batch``, and the convergence delta
    ``sum(attributions) - (f(x) - f(x0))`` per example in ``details["completeness_gap"]``.

    ``options``: ``n_steps`` (default 50), ``baselines`` (``x0``: a number or a tensor broadcast to the
    batch; default 0) and ``internal_batch_size`` (default ``max(N, INTEGRATED_GRADIENTS_ROWS)``): the
    path runs in chunks of ``max(1, internal_batch_size // N)`` whole steps of every example, summed
    in order, in float32 at least (as Captum sums: a bfloat16 model's gradients, float32 sums).
    ``attr`` (Captum's module) is unused: the signature is every method's.
    """
    n_steps = options.get("n_steps", DEFAULT_STEPS)
    steps_at_once = max(1, options.get("internal_batch_size", max(len(batch), INTEGRATED_GRADIENTS_ROWS)) // len(batch))
    start = (
        torch.as_tensor(options.get("baselines", 0.0), dtype=batch.dtype, device=batch.device)
        .expand_as(batch)
        .contiguous()
    )
    points, weights = path_rule(n_steps)
    total = torch.zeros_like(batch, dtype=torch.promote_types(batch.dtype, torch.float32))
    for first in range(0, n_steps, steps_at_once):
        chunk = slice(first, first + steps_at_once)
        total += _weighted_gradients(forward, start, batch, target, points[chunk], weights[chunk])
    values = total * (batch - start)
    with torch.no_grad():
        change = picked(forward(batch), target) - picked(forward(start), target)
    return values, {"completeness_gap": (values.flatten(1).sum(1) - change).detach()}


def _weighted_gradients(
    forward: Callable[[Tensor], Tensor],
    start: Tensor,
    end: Tensor,
    target: Tensor | None,
    points: tuple[float, ...],
    weights: tuple[float, ...],
) -> Tensor:
    """``sum_k weights[k] * grad f(start + points[k] (end - start))``, the steps run as one batch of rows."""
    shape = (len(points),) + (1,) * end.dim()
    along = torch.tensor(points, dtype=end.dtype, device=end.device).reshape(shape)
    rows = (start + along * (end - start)).reshape(-1, *end.shape[1:]).requires_grad_()
    scores = picked(forward(rows), None if target is None else target.repeat(len(points)))
    (gradients,) = torch.autograd.grad(scores.sum(), rows)
    scale = torch.tensor(weights, dtype=torch.promote_types(end.dtype, torch.float32), device=end.device)
    return (gradients.reshape(len(points), *end.shape) * scale.reshape(shape)).sum(0)
