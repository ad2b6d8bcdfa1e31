"""Running attributions: :func:`attribute` (a model and a preprocessed batch), :func:`explain` (a
predictor's inputs), their result :class:`Attributions`, and the gradient methods (integrated
gradients, saliency, occlusion). The methods' definitions are in :mod:`trainfer.analysis.attribution`;
the sampling ones live in :mod:`~trainfer.analysis.attribution_shap`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.analysis.attribution_gradient_shap import gradient_shap
from trainfer.analysis.attribution_ig import INTEGRATED_GRADIENTS_ROWS, integrated_gradients, picked
from trainfer.analysis.attribution_options import check_options, occlusion_defaults
from trainfer.analysis.attribution_shap import deeplift_shap, kernel_shap, lime, perturbations_at_once
from trainfer.errors import ExplanationError, InputError, InputTypeError, ModeError, NonFiniteError
from trainfer.extras import require
from trainfer.modes.contexts import restore_modes, snapshot_modes
from trainfer.validate import given

METHODS = ("integrated_gradients", "saliency", "occlusion", "kernel_shap", "lime", "gradient_shap", "deeplift_shap")
#: Integrated gradients' completeness check: the attributions must sum to ``f(x) - f(x0)`` within this
#: fraction of it. Sundararajan et al. (2017) aim at 5 %, but a trained classifier's float32 probability
#: misses that on a few inputs at any ``n_steps``; a map missing half the change says nothing (see
#: :func:`_check_completeness`). ``details["completeness_gap"]`` keeps the gap for a stricter check.
COMPLETENESS_TOLERANCE = 0.5
#: The methods whose Captum class hooks the modules of the model it explains (DeepLIFT's rules are forward
#: and backward hooks, live for the whole call): they run on :func:`private_copy`, never on the model other
#: threads may be predicting with, where the hooks would fire in their forwards. The other methods only
#: call the model. Captum's other hooking classes (DeepLift, GuidedBackprop, Deconvolution, GuidedGradCam,
#: LRP, the layer and neuron methods) are not offered.
HOOKED_METHODS = ("deeplift_shap",)

__all__ = [
    "COMPLETENESS_TOLERANCE",
    "HOOKED_METHODS",
    "INTEGRATED_GRADIENTS_ROWS",
    "METHODS",
    "Attributions",
    "attribute",
    "explain",
    "explain_batch",
    "private_copy",
]


@dataclass(frozen=True)
class Attributions:
    """Per-element attributions ``values`` with the shape of the preprocessed ``inputs`` ``(N, ...)``.

    ``target`` is the explained class per example (``None``: a single score was explained) and
    ``scores`` the explained score per example, ``f(x)``. ``details`` holds what a method reports
    beside the values: ``feature_mask`` (kernel_shap, lime), ``surrogate_r2`` (lime, one per example),
    ``completeness_gap`` (integrated_gradients, one per example: the attributions' sum minus
    ``f(x) - f(x0)``, checked by :func:`attribute`).
    """

    values: Tensor
    inputs: Tensor
    target: Tensor | None
    scores: Tensor
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)


def explain(
    predictor: Any, inputs: Any, method: str = "integrated_gradients", target: Any = None, **options: Any
) -> Attributions:
    """Explain ``predictor``'s predictions for ``inputs`` (anything ``predictor.preprocess`` accepts).

    The explained function is ``predictor.scores``, as served (probabilities for classification
    and binary, unscaled values for regression), which keeps autograd for inputs that require
    grad. Before anything is attributed, the batch's scores (one forward without gradients) go to
    ``predictor.check_scores``, ``predict``'s check: NaN or inf raises
    :class:`~trainfer.errors.NonFiniteError` naming the input samples (not for an autoregressive model,
    whose prediction is a search that ``predict`` does not check either). ``options`` go to Captum's
    ``attribute`` (e.g. ``n_steps``, ``baselines``, ``sliding_window_shapes``), each checked first
    (:func:`~trainfer.analysis.attribution_options.check_options`).
    """
    return explain_batch(predictor, predictor.preprocess(inputs).to(predictor.device), method, target, **options)


def explain_batch(
    predictor: Any, batch: Tensor, method: str = "integrated_gradients", target: Any = None, **options: Any
) -> Attributions:
    """:func:`explain` for a ``batch`` ``predictor.preprocess`` already made (on the predictor's device)."""
    if not isinstance(predictor.model, nn.Module):
        served = type(predictor.model).__name__
        raise InputTypeError(
            f"explanations need a torch model; this predictor serves a {served}: for a bundle, explain with "
            "Predictor.load(path, float_form=True), which serves its float PyTorch model"
        )
    if predictor.multi_head:
        raise InputError("explanations of multi-head predictors are not supported: serve one head to explain it")
    if not getattr(predictor, "generates", False):
        with torch.no_grad():
            predictor.check_scores(predictor.scores(batch))
    if predictor.task == "sequence":
        sequence_score = _generated_score if getattr(predictor, "generates", False) else _sequence_score
        if target is not None:
            raise InputError("a sequence prediction is explained for its decoded sequence: target= does not apply")
        # one item at a time: Captum's samplers (LIME, KernelSHAP) call f on one item's perturbations
        parts = [
            attribute(
                predictor.model, row, method, forward=sequence_score(predictor, row), task="regression", **options
            )
            for row in batch.split(1)
        ]
        details = {key: [p.details[key] for p in parts] for key in parts[0].details}
        return Attributions(
            torch.cat([p.values for p in parts]),
            batch.detach(),
            None,
            torch.cat([p.scores for p in parts]),
            method,
            details,
        )
    return attribute(predictor.model, batch, method, target, forward=predictor.scores, task=predictor.task, **options)


def _sequence_score(predictor: Any, batch: Tensor) -> Callable[[Tensor], Tensor]:
    """``f(x)``: the CTC log-probability of the sequence the predictor decodes for the one-item ``batch``.

    The sequence is decoded once, from ``batch``; ``f`` then sums the probabilities of every alignment
    of that sequence (``-ctc_loss``): the exact log-probability the beam's score bounds from below
    (a beam prunes prefixes whose alignments would have merged later), and differentiable. ``f``
    takes any number of rows (Captum stacks interpolated or perturbed copies of the item).
    """
    from trainfer import decoding

    settings = predictor.decoder
    with torch.no_grad():
        log_probs = predictor.scores(batch.detach())
    if settings.beam_width == 1:
        chosen = decoding.ctc_greedy(log_probs, blank=settings.blank)
    else:
        found = decoding.ctc_beam_search(log_probs, beam_width=settings.beam_width, blank=settings.blank)
        chosen = [list(hyps[0].tokens) for hyps in found]
    tokens = torch.tensor(chosen[0], dtype=torch.long)

    def score(x: Tensor) -> Tensor:
        values = predictor.scores(x)
        rows = len(values)
        frames = torch.full((rows,), values.shape[1], dtype=torch.long)
        lengths = torch.full((rows,), len(tokens), dtype=torch.long)
        loss = torch.nn.functional.ctc_loss(
            values.transpose(0, 1), tokens.repeat(rows), frames, lengths, blank=settings.blank, reduction="none"
        )
        return -loss

    return score


def _generated_score(predictor: Any, batch: Tensor) -> Callable[[Tensor], Tensor]:
    """``f(x)``: the log-probability an autoregressive model gives the sequence decoded for the one-item ``batch``.

    The sequence (EOS included when it ended) is decoded once, with the predictor's settings; ``f``
    then feeds it by teacher forcing, ``sum_t log p(y_t | y_<t, x)`` over ``encode(x)`` and ``step``:
    the search's ``log_prob`` of that sequence, differentiable in ``x``, for any number of rows.
    """
    settings, model = predictor.decoder, predictor.model
    (result,) = predictor.generate(batch.detach())
    tokens = [*result.tokens, settings.eos] if result.finished else list(result.tokens)

    def score(x: Tensor) -> Tensor:
        state = model.encode(x)
        previous = torch.full((len(x),), settings.bos, dtype=torch.long, device=x.device)
        total = x.new_zeros(len(x))
        for token in tokens:
            log_probs, state = model.step(state, previous)
            total = total + log_probs[:, token]
            previous = torch.full_like(previous, token)
        return total

    return score


def attribute(
    model: nn.Module,
    batch: Tensor,
    method: str = "integrated_gradients",
    target: Any = None,
    *,
    forward: Callable[[Tensor], Tensor] | None = None,
    task: str | None = None,
    **options: Any,
) -> Attributions:
    """Attribute ``forward(batch)`` (``model(batch)`` by default) to the elements of ``batch``.

    Runs ``model`` in eval mode with gradients on; restores its modes and the grad mode on exit.
    ``task="regression"`` never picks a class: a regression model with several outputs needs ``target``.
    Integrated gradients are checked for completeness (:func:`_check_completeness`): attributions that
    do not sum to ``f(x) - f(x0)`` raise :class:`~trainfer.errors.ExplanationError`, never a silent map.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {list(METHODS)}; got {method!r}")
    if not isinstance(batch, Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        raise InputTypeError(f"expected a preprocessed floating-point batch (N, ...); got {_describe(batch)}")
    options = check_options(method, batch, options)
    if torch.is_inference_mode_enabled():
        raise ModeError(
            "explanations need gradients, and torch.inference_mode() forbids them: call explain() outside "
            "`with torch.inference_mode():` / `with trainfer.inference(model):`"
        )
    attr = require("captum.attr", "explain", "explaining predictions")
    forward = forward or model
    batch = batch.detach().clone()  # an ordinary tensor, even if preprocessing made an inference tensor
    modes = snapshot_modes(model)
    try:
        with torch.enable_grad():
            model.eval()
            scores = _checked_scores(forward, batch)
            target = _resolve_target(scores, target, task)
            if method in HOOKED_METHODS:
                forward = private_copy(model, method)  # it explains the raw outputs, with hooks no other thread meets
            found = _METHODS[method](attr, forward, batch, target, options)
        values, details = found if isinstance(found, tuple) else (found, {})
        explained = picked(scores.detach(), target)
        if "completeness_gap" in details:
            _check_completeness(values.detach(), explained.reshape(-1), details["completeness_gap"])
        _check_finite(values.detach(), method)
        return Attributions(values.detach().to(batch.dtype), batch, target, explained.reshape(-1), method, details)
    finally:
        restore_modes(model, modes)


def private_copy(model: nn.Module, method: str) -> nn.Module:
    """A deep copy of ``model`` in eval mode, for one call of ``method``, one of :data:`HOOKED_METHODS`.

    Its hooks then live on modules no other thread runs: predictions sharing ``model`` never meet
    them, and the explanation never records their activations. It costs one copy of the weights per
    call (memory on the model's device, and time: see docs/inspection.md). A model ``copy.deepcopy``
    cannot copy (one holding a lock, say) is refused with :class:`InputTypeError`.
    """
    try:
        with torch.no_grad():
            return copy.deepcopy(model).eval()
    except (TypeError, RuntimeError, copy.Error) as error:
        raise InputTypeError(
            f"{method} hooks the modules of the model it explains, so it runs on a copy of it (other threads "
            f"may be running the model), and copy.deepcopy of this {type(model).__name__} fails: {error}"
        ) from None


def _checked_scores(forward: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """``forward(batch)`` once, checked to be a score tensor gradients can flow through."""
    probe = batch.clone().requires_grad_()
    scores = forward(probe)
    if not isinstance(scores, Tensor) or scores.dim() not in (1, 2) or len(scores) != len(batch):
        raise InputError(f"expected scores of shape (N,) or (N, outputs) with N={len(batch)}; got {_describe(scores)}")
    if not scores.requires_grad:
        raise ModeError(
            "the explained function returned scores without gradients (does it run under torch.no_grad or "
            "inference_mode?); explanations need a differentiable forward"
        )
    return scores


def _resolve_target(scores: Tensor, target: Any, task: str | None) -> Tensor | None:
    """The class index per example: ``target`` if given, else the predicted (argmax) class.

    ``None`` when the score is a single value per example (binary, one-output regression).
    """
    outputs = 1 if scores.dim() == 1 else scores.shape[1]
    if target is None:
        if outputs == 1:
            return None if scores.dim() == 1 else torch.zeros(len(scores), dtype=torch.long, device=scores.device)
        if task == "regression":
            raise InputError(f"a regression model with {outputs} outputs: pass target= the output index to explain")
        return scores.detach().argmax(dim=1)
    if scores.dim() == 1:
        raise InputError(f"target={target!r} given, but the model returns one score per example (shape (N,))")
    indices = _class_indices(target).to(scores.device).reshape(-1)
    if len(indices) not in (1, len(scores)):
        raise InputError(f"target must be one class index or one per example ({len(scores)}); got {len(indices)}")
    indices = indices.expand(len(scores))
    if ((indices < 0) | (indices >= outputs)).any():
        raise InputError(f"target must index the {outputs} outputs (0..{outputs - 1}); got {target!r}")
    return indices.clone()


def _class_indices(target: Any) -> Tensor:
    """``target`` (an int, a sequence or tensor of ints) as a long tensor; anything else is refused."""
    expected = "a class index (int) or one per example (a list or tensor of ints)"
    try:
        indices = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"target must be {expected}; got {given(target)}") from None
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise InputTypeError(f"target must be {expected}; got {given(target)}")
    return indices.long()


def _check_completeness(values: Tensor, scores: Tensor, gap: Tensor) -> None:
    """Raise :class:`ExplanationError` unless integrated gradients' attributions sum to ``f(x) - f(x0)``.

    Completeness holds for the exact integral; :func:`integrated_gradients` computes a quadrature of
    ``n_steps`` points of the path, which misses a score that changes within a sliver of it: a softmax probability whose
    logits are large saturates at 0 or 1 almost everywhere on the path (its gradient ``p (1 - p)``
    underflows to 0), so the map comes out (near) zero while ``f(x) - f(x0)`` is not. Allowed:
    :data:`COMPLETENESS_TOLERANCE` of ``|f(x) - f(x0)|``, or where the score barely changes,
    ``sqrt(eps)`` of the dtype times ``max(|f(x)|, |f(x0)|)`` (rounding, not a failed integral).
    Not 5 %: digits_net trained 15 epochs on the digits (max logit 34) misses 5 % on 14 of 200 test
    digits at 50 steps and on 3 at 200 and at 800 steps (float32 probabilities near 1), never 20 %;
    a saturated model misses about 100 %.
    NaN or inf on the path (``f(x0)``, a gradient) raises :class:`NonFiniteError` instead.
    """
    broken = (~torch.isfinite(gap)).nonzero().flatten().tolist()
    if broken:
        raise NonFiniteError(
            "integrated gradients meet NaN or inf between the baseline and the input of example(s) ",
            broken,
            ": expected finite scores and gradients on the path (the baseline x0 is zeros unless baselines= is given)",
        )
    rounding = torch.finfo(values.dtype).eps ** 0.5
    values, scores, gap = values.double(), scores.double(), gap.double().to(values.device)
    change = values.flatten(1).sum(1) - gap  # f(x) - f(x0), as measured with the attributions
    magnitude = torch.maximum(scores.abs(), (scores - change).abs())
    allowed = torch.maximum(COMPLETENESS_TOLERANCE * change.abs(), rounding * magnitude)
    failed = (gap.abs() > allowed).nonzero().flatten().tolist()
    if failed:
        i = failed[0]
        raise ExplanationError(
            "integrated gradients failed its completeness check for example(s) ",
            failed,
            f": the attributions of the first sum to {float(change[i] + gap[i]):.4g}, expected f(x) - f(x0) = "
            f"{float(change[i]):.4g} within {COMPLETENESS_TOLERANCE:.0%}: the explained score saturates between "
            "the baseline and the input (a probability at 0 or 1 has no gradient) or n_steps is too small; pass a "
            "larger n_steps=, baselines= nearer the input, or method='occlusion' (differences, no gradients)",
        )


def _check_finite(values: Tensor, method: str) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose attributions hold NaN or inf (every method's
    last check): finite options can overflow on the way, a ``baselines`` of 3e38 in float32 or a
    GradientSHAP ``stdevs`` of 1e308."""
    broken = (~torch.isfinite(values.flatten(1))).any(1).nonzero().flatten().tolist()
    if broken:
        raise NonFiniteError(
            f"{method} attributions of example(s) ",
            broken,
            " hold NaN or inf: expected finite values (baselines= or stdevs= far beyond the inputs' scale "
            "overflow the model)",
        )


def _saliency(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    return attr.Saliency(forward).attribute(batch.requires_grad_(), target=target, **options)


def _occlusion(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    """Windows of ``C x k x k`` (``k`` about an eighth of the image side, half-overlapping) or single columns
    (:func:`~trainfer.analysis.attribution_options.occlusion_defaults`), several occluded copies per
    forward (:func:`~trainfer.analysis.attribution_shap.perturbations_at_once`)."""
    settings = {
        **occlusion_defaults(tuple(batch.shape[1:])),
        "perturbations_per_eval": perturbations_at_once(batch),
        "show_progress": sys.stderr.isatty(),
    }
    with torch.no_grad():
        return attr.Occlusion(forward).attribute(batch, target=target, **{**settings, **options})


_METHODS: dict[str, Callable[..., Any]] = {
    "integrated_gradients": integrated_gradients,
    "saliency": _saliency,
    "occlusion": _occlusion,
    "kernel_shap": kernel_shap,
    "lime": lime,
    "gradient_shap": gradient_shap,
    "deeplift_shap": deeplift_shap,
}


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
