"""Explanations: which input pixels or columns drove a prediction, through Captum (``trainfer[explain]``).

Attributions need gradients, so they run in the one corner of the mode matrix the rest of trainfer
never uses: **eval mode with gradients on**. Every module's ``training`` flag and the grad mode are
restored afterwards, also on exceptions. ``torch.inference_mode`` is refused: no gradient can flow
there. Methods, for a score ``f`` of the input ``x`` and a baseline ``x0`` (zeros by default, in the
preprocessed space):

- ``integrated_gradients``: ``(x - x0) * mean_a grad f(x0 + a (x - x0))``; attributions sum to
  ``f(x) - f(x0)`` (completeness), and equal ``w * (x - x0)`` for a linear ``f = w.x + b``.
  Completeness is checked (Captum's convergence delta, in ``details["completeness_gap"]``): a sum
  off by more than half of ``f(x) - f(x0)`` raises :class:`~trainfer.errors.ExplanationError`. It
  fails where ``f`` is a saturated probability: ``d softmax(z)_c / d z_c = p (1 - p)`` is 0 on
  almost all of the path when the logits are large, so the ``n_steps`` quadrature sees no gradient
  although ``f`` changes (docs/inspection.md, "Integrated gradients: completeness");
- ``saliency``: ``|grad f(x)|``;
- ``occlusion``: ``f(x) - f(x with a window set to x0)``, spread over the window's elements;
- ``kernel_shap``: Shapley values of features (image patches, table columns; see
  :func:`feature_mask`) for the game "features present take their value in ``x``, absent ones
  their value in ``x0``", estimated from ``n_samples`` coalitions by Kernel SHAP's weighted linear
  regression; per feature they sum to ``f(x) - f(x0)`` (efficiency). Every element of a feature
  carries its feature's value: sum over features, not elements, to check it;
- ``lime``: the coefficients of a sparse linear surrogate (Lasso, alpha 0.01) fitted to ``f`` on
  ``n_samples`` random coalitions weighted by closeness to ``x``; the fit is recorded per example
  in ``details["surrogate_r2"]`` (weighted R^2 on those samples: how far to trust the surrogate;
  NaN when ``f`` does not vary on them). Both fit a weight per feature: ``n_samples`` is at least the
  features + 2, and ``n_samples`` times the features bounded (:mod:`~trainfer.analysis.attribution_options`);
- ``gradient_shap``: ``E[(x - b) * grad f(b + a (x - b))]`` over baselines ``b`` drawn from
  ``baselines`` and ``a ~ U(0, 1)`` (``n_samples`` draws; ``stdevs`` adds Gaussian noise to ``x``, as
  Captum's NoiseTunnel does); sums to ``f(x) - E f(b)`` in expectation, exactly for linear ``f``.
  Computed by trainfer with torch's random generator: ``torch.manual_seed`` repeats it, and NumPy's
  global generator, which Captum's GradientShap draws from, is never touched;
- ``deeplift_shap``: DeepLIFT's rescale rule averaged over the ``baselines`` (run in chunks of them); it sums to
  ``g(x) - mean_b g(b)`` where ``g`` is the MODEL's raw output (logits): its rules live on the
  model's modules, so it explains the model, not the served probabilities (on a copy of the model made
  for the call: other threads predicting with the model never meet those hooks).

Baselines, explicitly: ``x0`` is all zeros in the preprocessed space unless ``baselines=`` is
given (after the usual mean/std normalisation, zeros is the data set's mean image or row).
``gradient_shap`` and ``deeplift_shap`` take a reference BATCH (say, a few training samples);
the default is the zero baseline, twice for ``deeplift_shap`` (Captum needs two or more).
Sample budgets: ``n_samples`` (default 200 for ``kernel_shap`` and ``lime``, 20 for
``gradient_shap``); progress shows on a terminal (``show_progress=`` overrides).

``f`` is the predicted class's score by default (a ``target`` class index picks another), or the
score itself for binary and regression models with one output.

The concepts live in their own modules; this one re-exports their public names:
:mod:`~trainfer.analysis.attribution_methods` (:func:`attribute`, :func:`explain`, the gradient
methods), :mod:`~trainfer.analysis.attribution_ig` (integrated gradients' computation),
:mod:`~trainfer.analysis.attribution_gradient_shap` (GradientSHAP's computation),
:mod:`~trainfer.analysis.attribution_shap` (the sampling methods Captum computes, :func:`feature_mask`)
and :mod:`~trainfer.analysis.attribution_files` (:func:`explain_to_files`, :func:`check_file_targets`).
"""

from __future__ import annotations

from trainfer.analysis.attribution_files import check_file_targets, explain_to_files
from trainfer.analysis.attribution_methods import METHODS, Attributions, attribute, explain
from trainfer.analysis.attribution_shap import SAMPLE_BUDGET, feature_mask

__all__ = [
    "METHODS",
    "SAMPLE_BUDGET",
    "Attributions",
    "attribute",
    "check_file_targets",
    "explain",
    "explain_to_files",
    "feature_mask",
]
