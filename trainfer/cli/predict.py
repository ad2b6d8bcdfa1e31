"""``trainfer predict BUNDLE INPUT...``: typed predictions for image files, ``.npy`` arrays and CSV rows.

Three small steps, each reusable: :func:`load_predictor` (bundle or ``.onnx`` -> Predictor),
:func:`gather_inputs` (INPUT paths -> ``(id, sample)`` pairs, streamed) and :func:`write_results`
(``(id, result)`` pairs -> table, JSON lines or CSV on a stream).
"""

from __future__ import annotations

import collections
import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import click
import numpy as np

from trainfer.cli.common import friendly_errors
from trainfer.predict import Predictor
from trainfer.preprocess import IMAGE_SUFFIXES, PreprocessSpec, iter_csv

FORMATS = ("table", "jsonl", "csv")


def load_predictor(bundle: str, batch_size: int, device: str, threshold: float | None) -> Predictor:
    """A :class:`Predictor` for a bundle directory or an exported ``.onnx`` file."""
    overrides: dict[str, Any] = {"batch_size": batch_size, "device": device}
    if threshold is not None:
        overrides["threshold"] = threshold
    return Predictor.load(bundle, **overrides)


def gather_inputs(paths: Iterable[str], spec: PreprocessSpec) -> Iterator[tuple[str, Any]]:
    """``(id, sample)`` for every sample of every INPUT, in order and lazily.

    An image is one sample (id: its path); a ``.npy`` array gives one sample per row (id:
    ``path[i]``, memory-mapped); a CSV file one per data row (id: ``path:i``, 0-based).
    """
    for text in paths:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {text!r}")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            yield text, text
        elif suffix == ".npy":
            yield from _npy_rows(path, spec)
        elif suffix == ".csv":
            rows = (row for chunk in iter_csv(path, spec) for row in chunk.split(1))
            yield from ((f"{text}:{index}", row) for index, row in enumerate(rows))
        else:
            raise ValueError(f"cannot read {text!r}: expected image files, a .npy file or a .csv file")


def _npy_rows(path: Path, spec: PreprocessSpec) -> Iterator[tuple[str, Any]]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {str(path)!r} as a .npy array: {error}") from None
    if spec.input_shape is not None and array.ndim == len(spec.input_shape):
        array = array[None]
    for index in range(len(array)):
        yield f"{path}[{index}]", np.array(array[index : index + 1])


def predictions(predictor: Predictor, items: Iterator[tuple[str, Any]], top_k: int | None) -> Iterator[tuple[str, Any]]:
    """``(id, result)`` pairs, streamed: ids wait in a queue only as long as their batch."""
    waiting: collections.deque[str] = collections.deque()

    def samples() -> Iterator[Any]:
        for identifier, sample in items:
            waiting.append(identifier)
            yield sample

    for result in predictor.predict_iter(samples(), top_k=top_k):
        yield waiting.popleft(), result


def flat_record(identifier: str, result: Any) -> dict[str, Any]:
    """A result's record as one level of columns: nested keys joined by ``.``, pairs as ``label=p``."""
    flat: dict[str, Any] = {"id": identifier}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list) and value and isinstance(value[0], list):
            flat[prefix] = " ".join(f"{label}={_number(p)}" for label, p in value)
        elif isinstance(value, list):
            flat[prefix] = " ".join(_number(v) for v in value)
        else:
            flat[prefix] = value

    visit("", result.to_record())
    return flat


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_results(pairs: Iterable[tuple[str, Any]], fmt: str, stream: IO[str]) -> int:
    """Write ``(id, result)`` pairs as ``table``, ``jsonl`` or ``csv``; return how many were written."""
    if fmt == "jsonl":
        count = 0
        for identifier, result in pairs:
            stream.write(json.dumps({"id": identifier, **result.to_record()}) + "\n")
            count += 1
        return count
    rows = [flat_record(identifier, result) for identifier, result in pairs]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if fmt == "csv":
        writer = csv.DictWriter(stream, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        cells = [[_number(row.get(c, "")) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        for line in [columns, *cells]:
            stream.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n")
    return len(rows)


@click.command("predict")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Report the k most probable classes.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Decision threshold (binary tasks).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA, then MPS, then CPU), cpu, cuda:N, mps.")
@friendly_errors
def command(
    bundle: str,
    inputs: tuple[str, ...],
    top_k: int | None,
    threshold: float | None,
    fmt: str,
    batch_size: int,
    device: str,
) -> None:
    """Predict INPUT... (image files, a .npy file or a CSV file) with the model of BUNDLE (or a .onnx file)."""
    predictor = load_predictor(bundle, batch_size, device, threshold)
    items = gather_inputs(inputs, predictor.preprocess_spec)
    write_results(predictions(predictor, items, top_k), fmt, click.get_text_stream("stdout"))
