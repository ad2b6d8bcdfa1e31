"""Explanations as files: the examples explained in chunks, each drawn to a PNG (:mod:`.attribution_plots`)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from trainfer.analysis.attribution_methods import Attributions, explain_batch
from trainfer.analysis.attribution_options import example_rows, most_examples_at_once
from trainfer.analysis.attribution_plots import AttributionPlotter, TargetKind, plot_attribution
from trainfer.atomic import check_target
from trainfer.errors import (
    ExplanationError,
    ExplanationsIncomplete,
    ExplanationWarning,
    InputError,
    NonFiniteError,
    one_line,
)

__all__ = ["CHUNK_EXAMPLES", "check_file_targets", "explain_each", "explain_to_files", "file_names", "plot_attribution"]

#: The most examples :func:`explain_each` explains in one call. On digits_net with integrated gradients,
#: one example at a time took 37.9 ms of CPU per example, chunks of 16 24.6 ms, of 32 22.7 ms
#: (``benchmarks/bench_explain_files.py``, 1 thread); integrated gradients then runs 16 rows at once
#: (one step of the path for the chunk) where one example ran 8
#: (:data:`~trainfer.analysis.attribution_methods.INTEGRATED_GRADIENTS_ROWS`).
CHUNK_EXAMPLES = 16
#: The longest file name most file systems take, in bytes: an explanation named after a longer input is refused.
MAX_NAME_BYTES = 255
#: The name of an explanation file of a row of an input file: ``<index>_<stem>_<row>.png`` (:func:`file_names`).
_ROW_NAME = r"[0-9]{{3,}}_{stem}_[0-9]+\.png"


def explain_to_files(
    predictor: Any,
    inputs: Any,
    out_dir: str | Path,
    method: str = "integrated_gradients",
    target: Any = None,
    **options: Any,
) -> list[Path]:
    """Write one PNG per example to ``out_dir``: a heat map over each image, a bar chart per table row.

    Files are named as :func:`file_names` says (``000_seven.png``, ``001_rows_0.png``, ...); returns their paths. The
    examples are explained in chunks (:func:`explain_each`) and each chunk's PNGs written (atomically)
    before the next chunk is explained, so a failure loses at most one chunk's explanations, never a
    file. An example whose explanation fails its method's check (:class:`~trainfer.errors.ExplanationError`)
    or meets NaN or inf (:class:`~trainfer.errors.NonFiniteError`) when explained alone is skipped with one
    :class:`~trainfer.errors.ExplanationWarning` line naming it and why; once every other example is
    written, :class:`~trainfer.errors.ExplanationsIncomplete` names the skipped ones. Any other error (a
    bad option, a write that fails) stops the run at once.
    """
    batch, counts = _preprocessed(predictor, inputs)
    batch = batch.to(predictor.device)
    names = file_names(inputs, counts)
    target_kind: TargetKind = "class" if predictor.task == "classification" else "output"
    plotter = AttributionPlotter(predictor.labels, predictor.preprocess_spec.columns, target_kind)
    paths: list[Path] = []
    failed: list[tuple[int, str, str]] = []
    with tqdm(total=len(batch), desc="explanations", unit="file", disable=None) as progress:
        for i, outcome, row in explain_each(predictor, batch, method, target, **options):
            if isinstance(outcome, Attributions):
                paths.append(plotter.draw(outcome, row, Path(out_dir) / names[i]))
            else:  # named as the whole run counts its examples
                reason = one_line(outcome.counted_from(i))
                failed.append((i, names[i], reason))
                warnings.warn(f"example {i} ({names[i]}) not explained: {reason}", ExplanationWarning, stacklevel=2)
            progress.update()
    if failed:
        listed = ", ".join(f"{i} ({name})" for i, name, _ in failed[:10]) + (", ..." if len(failed) > 10 else "")
        raise ExplanationsIncomplete(
            f"{len(failed)} of {len(batch)} examples could not be explained (each named above): {listed}; "
            f"the {len(paths)} others are written in {str(out_dir)!r}",
            paths,
            failed,
        )
    return paths


def explain_each(
    predictor: Any, batch: Tensor, method: str = "integrated_gradients", target: Any = None, **options: Any
) -> Iterator[tuple[int, Attributions | ExplanationError | NonFiniteError, int]]:
    """Explain every example of the preprocessed ``batch``, in order: ``(index, attributions, row)``, the
    example being row ``row`` of ``attributions``, or ``(index, error, 0)`` where explaining it alone
    failed its method's check or met NaN or inf (the error numbers it 0, as the example alone).

    Chunks of at most :data:`CHUNK_EXAMPLES` examples (and
    :func:`~trainfer.analysis.attribution_options.most_examples_at_once`) go to
    :func:`~trainfer.analysis.attribution_methods.explain_batch` together, each with its rows of a
    per-example ``target`` and options; a chunk that fails that way is explained again one example at
    a time, so exactly the examples that fail alone are reported. Other errors propagate.
    """
    size = min(CHUNK_EXAMPLES, most_examples_at_once(method, tuple(batch.shape[1:]), options))
    for start in range(0, len(batch), size):
        yield from _explain_chunk(predictor, batch, start, min(start + size, len(batch)), method, target, options)


def _explain_chunk(
    predictor: Any, batch: Tensor, start: int, stop: int, method: str, target: Any, options: dict[str, Any]
) -> Iterator[tuple[int, Attributions | ExplanationError | NonFiniteError, int]]:
    """:func:`explain_each` for examples ``start:stop``."""
    rows = example_rows(method, options, batch, start, stop)
    outcome: Attributions | ExplanationError | NonFiniteError
    try:
        outcome = explain_batch(
            predictor, batch[start:stop], method, _target_rows(target, start, stop, len(batch)), **rows
        )
    except (ExplanationError, NonFiniteError) as error:
        outcome = error
    if isinstance(outcome, Attributions):
        yield from ((i, outcome, i - start) for i in range(start, stop))
    elif stop - start == 1:
        yield start, outcome, 0
    else:  # which examples fail: each alone
        for i in range(start, stop):
            yield from _explain_chunk(predictor, batch, i, i + 1, method, target, options)


def _target_rows(target: Any, start: int, stop: int, count: int) -> Any:
    """``target`` for examples ``start:stop`` of ``count``: their entries where one per example was given."""
    if isinstance(target, Sequence | Tensor) and not isinstance(target, str) and count > 1 and len(target) == count:
        return target[start:stop]
    return target


def file_names(inputs: Any, counts: Sequence[int]) -> list[str]:
    """The names :func:`explain_to_files` gives the examples of ``inputs``, ``counts[i]`` of them from its
    ``i``-th input path; ``<index>`` counts the examples of the whole run (3 digits or more):

    - a file giving one example (an image): ``<index>_<stem>.png``;
    - each example of a file giving several (the rows of a ``.npy`` or CSV file):
      ``<index>_<stem>_<row>.png``, ``<row>`` counted from 0 within the file, as ``trainfer predict``'s
      ids ``file[row]`` and ``file:row`` count it;
    - examples that are not read from paths (tensors, arrays, lists): ``<index>.png``.
    """
    paths = _paths(inputs)
    if paths is None:
        return [f"{i:03d}.png" for i in range(sum(counts))]
    stems = [
        Path(path).stem if count == 1 else f"{Path(path).stem}_{row}"
        for path, count in zip(paths, counts, strict=True)
        for row in range(count)
    ]
    return [f"{i:03d}_{stem}.png" for i, stem in enumerate(stems)]


def _preprocessed(predictor: Any, inputs: Any) -> tuple[Tensor, list[int]]:
    """The examples of ``inputs`` as one preprocessed batch, and how many each input path gave (all of
    them as one count where ``inputs`` are not paths)."""
    paths = _paths(inputs)
    if paths is None:
        batch = predictor.preprocess(inputs)
        return batch, [len(batch)]
    parts = [predictor.preprocess(path) for path in paths]
    shapes = sorted({tuple(part.shape[1:]) for part in parts})
    if len(shapes) > 1:
        raise InputError(f"inputs have different sample shapes {shapes}: expected one shape")
    return torch.cat(parts), [len(part) for part in parts]


def check_file_targets(inputs: Any, out_dir: str | Path, option: str = "--explain") -> None:
    """Refuse, before any work, a file :func:`explain_to_files` may write into ``out_dir`` that exists and
    is not a regular file (:func:`trainfer.atomic.check_target`: a FIFO, a device, a link to one).

    How many examples ``inputs`` hold is known only once they are read, so the names checked are those
    of one example per input path and every ``<index>_<stem>_<row>.png`` of an input's stem already in
    ``out_dir`` (another count's).
    """
    out_dir = Path(out_dir)
    paths = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    stems = "|".join(sorted({re.escape(Path(path).stem) for path in paths}))
    row_name = re.compile(_ROW_NAME.format(stem=f"(?:{stems})"))
    rows = [entry.name for entry in _entries(out_dir) if row_name.fullmatch(entry.name)]
    for name in [*file_names(paths, [1] * len(paths)), *rows]:
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise InputError(
                f"{option}: an explanation would be written as {name[:40]!r}... ({len(os.fsencode(name))} bytes): "
                f"expected a file name of at most {MAX_NAME_BYTES} bytes (shorten the input file's name)"
            )
        check_target(out_dir / name, option)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory``, none when it is not one (yet)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _paths(inputs: Any) -> list[str | Path] | None:
    """``inputs`` as a list of paths when it is a path or a sequence of paths, else None."""
    items = [inputs] if isinstance(inputs, str | Path) else inputs
    if isinstance(items, Sequence) and items and all(isinstance(i, str | Path) for i in items):
        return list(items)
    return None
