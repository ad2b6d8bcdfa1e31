"""Explanations: which input pixels or columns drove a prediction, through Captum (``trainfer[explain]``).

Attributions need gradients, so they run in the one corner of the mode matrix the rest of trainfer
never uses: **eval mode with gradients on**. Every module's ``training`` flag and the grad mode are
restored afterwards, also on exceptions. ``torch.inference_mode`` is refused: no gradient can flow
there. Methods, for a score ``f`` of the input ``x`` and a baseline ``x0`` (zeros by default, in the
preprocessed space):

- ``integrated_gradients``: ``(x - x0) * mean_a grad f(x0 + a (x - x0))``; attributions sum to
  ``f(x) - f(x0)`` (completeness), and equal ``w * (x - x0)`` for a linear ``f = w.x + b``;
- ``saliency``: ``|grad f(x)|``;
- ``occlusion``: ``f(x) - f(x with a window set to x0)``, spread over the window's elements;
- ``kernel_shap``: Shapley values of features (image patches, table columns; see
  :func:`feature_mask`) for the game "features present take their value in ``x``, absent ones
  their value in ``x0``", estimated from ``n_samples`` coalitions by Kernel SHAP's weighted linear
  regression; per feature they sum to ``f(x) - f(x0)`` (efficiency). Every element of a feature
  carries its feature's value: sum over features, not elements, to check it;
- ``lime``: the coefficients of a sparse linear surrogate (Lasso, alpha 0.01) fitted to ``f`` on
  ``n_samples`` random coalitions weighted by closeness to ``x``; the fit is recorded per example
  in ``details["surrogate_r2"]`` (weighted R^2 on those samples: how far to trust the surrogate);
- ``gradient_shap``: ``E[(x - b) * grad f(b + a (x - b))]`` over baselines ``b`` drawn from
  ``baselines`` and ``a ~ U(0, 1)`` (``n_samples`` draws); sums to ``f(x) - E f(b)`` in expectation,
  exactly for linear ``f``;
- ``deeplift_shap``: DeepLIFT's rescale rule averaged over the ``baselines``; it sums to
  ``g(x) - mean_b g(b)`` where ``g`` is the MODEL's raw output (logits): its rules live on the
  model's modules, so it explains the model, not the served probabilities.

Baselines, explicitly: ``x0`` is all zeros in the preprocessed space unless ``baselines=`` is
given (after the usual mean/std normalisation, zeros is the data set's mean image or row).
``gradient_shap`` and ``deeplift_shap`` take a reference BATCH (say, a few training samples);
the default is the zero baseline, twice for ``deeplift_shap`` (Captum needs two or more).
Sample budgets: ``n_samples`` (default 200 for ``kernel_shap`` and ``lime``, 20 for
``gradient_shap``); progress shows on a terminal (``show_progress=`` overrides).

``f`` is the predicted class's score by default (a ``target`` class index picks another), or the
score itself for binary and regression models with one output.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from trainfer.atomic import atomic_file
from trainfer.errors import InputError, InputTypeError, ModeError
from trainfer.extras import require
from trainfer.modes.contexts import restore_modes, snapshot_modes
from trainfer.validate import given

METHODS = ("integrated_gradients", "saliency", "occlusion", "kernel_shap", "lime", "gradient_shap", "deeplift_shap")
SAMPLE_BUDGET = {"kernel_shap": 200, "lime": 200, "gradient_shap": 20}
"""Default ``n_samples`` per sampling method."""

__all__ = ["METHODS", "SAMPLE_BUDGET", "Attributions", "attribute", "explain", "explain_to_files", "feature_mask"]


@dataclass(frozen=True)
class Attributions:
    """Per-element attributions ``values`` with the shape of the preprocessed ``inputs`` ``(N, ...)``.

    ``target`` is the explained class per example (``None``: a single score was explained) and
    ``scores`` the explained score per example, ``f(x)``. ``details`` holds what a method reports
    beside the values: ``feature_mask`` (kernel_shap, lime), ``surrogate_r2`` (lime, one per example).
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
    grad. ``options`` go to Captum's ``attribute`` (e.g. ``n_steps``, ``baselines``,
    ``sliding_window_shapes``).
    """
    if not isinstance(predictor.model, nn.Module):
        served = type(predictor.model).__name__
        raise InputTypeError(f"explanations need a torch model; this predictor serves a {served}")
    if predictor.multi_head:
        raise InputError("explanations of multi-head predictors are not supported: serve one head to explain it")
    batch = predictor.preprocess(inputs).to(predictor.device)
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
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {list(METHODS)}; got {method!r}")
    if not isinstance(batch, Tensor) or not batch.is_floating_point() or batch.dim() < 2:
        raise InputTypeError(f"expected a preprocessed floating-point batch (N, ...); got {_describe(batch)}")
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
            if method == "deeplift_shap":
                forward = model  # DeepLIFT's rules hook the model's modules: it explains the raw outputs
            found = _METHODS[method](attr, forward, batch, target, options)
        values, details = found if isinstance(found, tuple) else (found, {})
        explained = scores.detach() if target is None else scores.detach().gather(1, target[:, None])[:, 0]
        return Attributions(values.detach().to(batch.dtype), batch, target, explained.reshape(-1), method, details)
    finally:
        restore_modes(model, modes)


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


def _integrated_gradients(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    return attr.IntegratedGradients(forward).attribute(batch, target=target, **options)


def _saliency(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    return attr.Saliency(forward).attribute(batch.requires_grad_(), target=target, **options)


def _occlusion(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    """Windows of ``C x k x k`` (``k`` about an eighth of the image side, half-overlapping) or single columns."""
    sample = batch.shape[1:]
    window: tuple[int, ...]
    strides: tuple[int, ...] | int
    if len(sample) == 3:
        side = max(1, round(min(sample[1:]) / 8))
        window, strides = (sample[0], side, side), (sample[0], max(1, side // 2), max(1, side // 2))
    else:
        window, strides = (1,) * len(sample), 1
    settings = {"sliding_window_shapes": window, "strides": strides, "show_progress": sys.stderr.isatty()}
    with torch.no_grad():
        return attr.Occlusion(forward).attribute(batch, target=target, **{**settings, **options})


def feature_mask(batch: Tensor, patch: int | None = None) -> Tensor:
    """Feature ids for KernelSHAP and LIME, shape ``(1, *batch.shape[1:])`` (shared by the batch).

    Images ``(N, C, H, W)`` and ``(N, H, W)``: square patches of side ``patch`` (default: a quarter
    of the shorter side, so about 16 features), all channels of a patch one feature. Tables
    ``(N, F)``: one feature per column. Other shapes: one feature per element.
    """
    sample = batch.shape[1:]
    if len(sample) in (2, 3):
        height, width = sample[-2:]
        side = patch or max(1, min(height, width) // 4)
        if side < 1:
            raise InputError(f"patch must be a positive side length; got {patch!r}")
        rows, cols = torch.arange(height) // side, torch.arange(width) // side
        ids = rows[:, None] * ((width + side - 1) // side) + cols[None, :]
        return ids.expand(sample).reshape(1, *sample).to(batch.device)
    return torch.arange(sample.numel(), device=batch.device).reshape(1, *sample)


def _sampling_settings(method: str, batch: Tensor, options: dict) -> tuple[dict, dict]:
    """Captum arguments (mask, budget, zero baselines, progress) with ``options`` on top; the patch option."""
    options = dict(options)
    mask = options.pop("feature_mask", None)
    if mask is None:
        mask = feature_mask(batch, options.pop("patch", None))
    settings = {
        "feature_mask": mask,
        "n_samples": SAMPLE_BUDGET[method],
        "baselines": 0.0,
        "show_progress": sys.stderr.isatty(),
    }
    return {**settings, **options}, {"feature_mask": mask}


def _kernel_shap(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Any:
    settings, details = _sampling_settings("kernel_shap", batch, options)
    with torch.no_grad(), _one_fit_per_example():
        return attr.KernelShap(forward).attribute(batch, target=target, **settings), details


def _lime(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Any:
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
    """Captum's Lasso surrogate that also records, per fit, its weighted R^2 on the samples it was fitted to."""
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
            self.r2.append(float(1 - (w * error**2).sum() / spread) if spread > 0 else 1.0)
            return result

    return RecordingLasso(alpha=alpha)


def _reference_batch(batch: Tensor, options: dict, copies: int) -> dict:
    """``options`` with ``baselines`` defaulting to ``copies`` zero samples."""
    return {"baselines": torch.zeros((copies, *batch.shape[1:]), dtype=batch.dtype, device=batch.device), **options}


def _gradient_shap(attr: ModuleType, forward: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    settings = {"n_samples": SAMPLE_BUDGET["gradient_shap"], **_reference_batch(batch, options, 1)}
    return attr.GradientShap(forward).attribute(batch, target=target, **settings)


def _deeplift_shap(attr: ModuleType, model: Callable, batch: Tensor, target: Any, options: dict) -> Tensor:
    if not isinstance(model, nn.Module):
        raise InputTypeError("deeplift_shap needs the model as an nn.Module (its rules hook the model's modules)")
    return attr.DeepLiftShap(model).attribute(batch, target=target, **_reference_batch(batch, options, 2))


_METHODS: dict[str, Callable[..., Any]] = {
    "integrated_gradients": _integrated_gradients,
    "saliency": _saliency,
    "occlusion": _occlusion,
    "kernel_shap": _kernel_shap,
    "lime": _lime,
    "gradient_shap": _gradient_shap,
    "deeplift_shap": _deeplift_shap,
}


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---- files: heat maps for images, bar charts for table rows -----------------------------------------------


def explain_to_files(
    predictor: Any,
    inputs: Any,
    out_dir: str | Path,
    method: str = "integrated_gradients",
    target: Any = None,
    **options: Any,
) -> list[Path]:
    """Write one PNG per example to ``out_dir``: a heat map over each image, a bar chart per table row.

    Files are named ``<index>_<input file stem>.png`` (or ``<index>.png``); returns their paths.
    """
    result = explain(predictor, inputs, method, target, **options)
    out_dir = Path(out_dir)
    stems = _stems(inputs, len(result))
    labels, columns = predictor.labels, predictor.preprocess_spec.columns
    paths = []
    for i in tqdm(range(len(result)), desc="explanations", unit="file", disable=None):
        path = out_dir / (f"{i:03d}_{stems[i]}.png" if stems else f"{i:03d}.png")
        paths.append(plot_attribution(result, i, path, labels=labels, columns=columns))
    return paths


def _stems(inputs: Any, count: int) -> list[str] | None:
    """Input file names without suffix, when ``inputs`` is one path per example."""
    items = [inputs] if isinstance(inputs, str | Path) else inputs
    if isinstance(items, Sequence) and len(items) == count and all(isinstance(i, str | Path) for i in items):
        return [Path(i).stem for i in items]
    return None


def plot_attribution(
    result: Attributions,
    index: int,
    path: Path,
    labels: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> Path:
    """Draw example ``index``: input and attribution overlay for ``(C, H, W)``/``(H, W)``, bars for ``(F,)``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    values, sample = result.values[index].cpu().double(), result.inputs[index].cpu().double()
    if values.dim() == 1:
        figure = _bars(plt, values, columns)
    elif values.dim() in (2, 3):
        figure = _heat_map(plt, values, sample)
    else:
        raise InputError(f"can draw attributions of shape (F,), (H, W) or (C, H, W); got {tuple(values.shape)}")
    figure.suptitle(_title(result, index, labels))
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return path


def _heat_map(plt: Any, values: Tensor, sample: Tensor) -> Any:
    """Left: the input (rescaled to [0, 1]); right: attributions summed over channels, over it."""
    image = sample if sample.dim() == 2 else (sample.permute(1, 2, 0) if sample.shape[0] == 3 else sample.mean(0))
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    heat = values if values.dim() == 2 else values.sum(0)
    limit = float(heat.abs().max()) or 1.0
    figure, (left, right) = plt.subplots(1, 2, figsize=(7, 3.4))
    for axis in (left, right):
        axis.imshow(image.numpy(), cmap="gray")
        axis.axis("off")
    left.set_title("input")
    shown = right.imshow(heat.numpy(), cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
    right.set_title("attribution")
    figure.colorbar(shown, ax=right, fraction=0.046)
    return figure


def _bars(plt: Any, values: Tensor, columns: Sequence[str] | None) -> Any:
    names = list(columns) if columns and len(columns) == len(values) else [f"x{i}" for i in range(len(values))]
    figure, axis = plt.subplots(figsize=(7, max(2.5, 0.3 * len(names) + 1)))
    axis.barh(names, values.numpy(), color=["tab:red" if v > 0 else "tab:blue" for v in values.tolist()])
    axis.invert_yaxis()  # first column on top
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("attribution")
    return figure


def _title(result: Attributions, index: int, labels: Sequence[str] | None) -> str:
    score = f"score {float(result.scores[index]):.4g}"
    if result.target is None:
        return f"{result.method}: {score}"
    klass = int(result.target[index])
    name = labels[klass] if labels is not None and klass < len(labels) else f"class {klass}"
    return f"{result.method}: {name} ({score})"
