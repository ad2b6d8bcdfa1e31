"""Explanations as files: a heat map over each image, a bar chart per table row (PNG, written atomically)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from trainfer.analysis.attribution_methods import Attributions, explain_batch
from trainfer.atomic import atomic_file, check_target
from trainfer.errors import (
    ExplanationError,
    ExplanationsIncomplete,
    ExplanationWarning,
    InputError,
    NonFiniteError,
    one_line,
)

__all__ = ["check_file_targets", "explain_to_files", "file_names", "plot_attribution"]

#: The names of explanation files when the examples are not one per input path (:func:`file_names`).
_NUMBERED = re.compile(r"[0-9]{3,}\.png")


def explain_to_files(
    predictor: Any,
    inputs: Any,
    out_dir: str | Path,
    method: str = "integrated_gradients",
    target: Any = None,
    **options: Any,
) -> list[Path]:
    """Write one PNG per example to ``out_dir``: a heat map over each image, a bar chart per table row.

    Files are named ``<index>_<input file stem>.png`` (or ``<index>.png``); returns their paths. Each
    example is explained alone and its PNG written (atomically) before the next is explained, so a
    failure loses nothing already done. An example whose explanation fails its method's check
    (:class:`~trainfer.errors.ExplanationError`) or meets NaN or inf (:class:`~trainfer.errors.NonFiniteError`)
    is skipped with one :class:`~trainfer.errors.ExplanationWarning` line naming it and why; once every
    other example is written, :class:`~trainfer.errors.ExplanationsIncomplete` names the skipped ones.
    Any other error (a bad option, a write that fails) stops the run at once.
    """
    batch = predictor.preprocess(inputs).to(predictor.device)
    names = file_names(inputs, len(batch))
    labels, columns = predictor.labels, predictor.preprocess_spec.columns
    paths: list[Path] = []
    failed: list[tuple[int, str, str]] = []
    for i in tqdm(range(len(batch)), desc="explanations", unit="file", disable=None):
        try:
            result = explain_batch(predictor, batch[i : i + 1], method, _one_target(target, i, len(batch)), **options)
        except (ExplanationError, NonFiniteError) as error:  # named as the whole run counts its examples
            reason = one_line(error.counted_from(i))
            failed.append((i, names[i], reason))
            warnings.warn(f"example {i} ({names[i]}) not explained: {reason}", ExplanationWarning, stacklevel=2)
            continue
        paths.append(plot_attribution(result, 0, Path(out_dir) / names[i], labels=labels, columns=columns))
    if failed:
        listed = ", ".join(f"{i} ({name})" for i, name, _ in failed[:10]) + (", ..." if len(failed) > 10 else "")
        raise ExplanationsIncomplete(
            f"{len(failed)} of {len(batch)} examples could not be explained (each named above): {listed}; "
            f"the {len(paths)} others are written in {str(out_dir)!r}",
            paths,
            failed,
        )
    return paths


def _one_target(target: Any, index: int, count: int) -> Any:
    """``target`` for example ``index`` explained alone: its own entry where one per example was given."""
    if isinstance(target, Sequence | Tensor) and not isinstance(target, str) and count > 1 and len(target) == count:
        return target[index : index + 1]
    return target


def file_names(inputs: Any, count: int) -> list[str]:
    """The names :func:`explain_to_files` gives ``count`` examples of ``inputs``: ``<index>_<input file
    stem>.png`` when ``inputs`` is one path per example, else ``<index>.png``."""
    stems = _stems(inputs, count)
    return [f"{i:03d}_{stems[i]}.png" if stems else f"{i:03d}.png" for i in range(count)]


def check_file_targets(inputs: Any, out_dir: str | Path, option: str = "--explain") -> None:
    """Refuse, before any work, a file :func:`explain_to_files` may write into ``out_dir`` that exists and
    is not a regular file (:func:`trainfer.atomic.check_target`: a FIFO, a device, a link to one).

    How many examples ``inputs`` hold is known only once they are read, so the names checked are those
    of one example per input path and every ``<index>.png`` already in ``out_dir`` (another count's).
    """
    out_dir = Path(out_dir)
    paths = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    numbered = [entry.name for entry in _entries(out_dir) if _NUMBERED.fullmatch(entry.name)]
    for name in [*file_names(paths, len(paths)), *numbered]:
        check_target(out_dir / name, option)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory``, none when it is not one (yet)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


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
