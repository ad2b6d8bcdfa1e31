"""Explanations: which input pixels or columns drove a prediction, through Captum (``trainfer[explain]``).

Attributions need gradients, so they run in the one corner of the mode matrix the rest of trainfer
never uses: **eval mode with gradients on**. Every module's ``training`` flag and the grad mode are
restored afterwards, also on exceptions. ``torch.inference_mode`` is refused: no gradient can flow
there. Methods, for a score ``f`` of the input ``x`` and a baseline ``x0`` (zeros by default, in the
preprocessed space):

- ``integrated_gradients``: ``(x - x0) * mean_a grad f(x0 + a (x - x0))``; attributions sum to
  ``f(x) - f(x0)`` (completeness), and equal ``w * (x - x0)`` for a linear ``f = w.x + b``;
- ``saliency``: ``|grad f(x)|``;
- ``occlusion``: ``f(x) - f(x with a window set to x0)``, spread over the window's elements.

``f`` is the predicted class's score by default (a ``target`` class index picks another), or the
score itself for binary and regression models with one output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

METHODS = ("integrated_gradients", "saliency", "occlusion")

__all__ = ["METHODS", "Attributions", "attribute", "explain", "explain_to_files"]


@dataclass(frozen=True)
class Attributions:
    """Per-element attributions ``values`` with the shape of the preprocessed ``inputs`` ``(N, ...)``.

    ``target`` is the explained class per example (``None``: a single score was explained) and
    ``scores`` the explained score per example, ``f(x)``.
    """

    values: Tensor
    inputs: Tensor
    target: Tensor | None
    scores: Tensor
    method: str

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
    return attribute(predictor.model, batch, method, target, forward=predictor.scores, task=predictor.task, **options)


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
            values = _METHODS[method](attr, forward, batch, target, options)
        explained = scores.detach() if target is None else scores.detach().gather(1, target[:, None])[:, 0]
        return Attributions(values.detach().to(batch.dtype), batch, target, explained.reshape(-1), method)
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


_METHODS = {"integrated_gradients": _integrated_gradients, "saliency": _saliency, "occlusion": _occlusion}


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
