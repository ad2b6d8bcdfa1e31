"""``trainfer predict BUNDLE INPUT...``: typed predictions for image files, ``.npy`` arrays and CSV rows.

Three small steps, each reusable: :func:`load_predictor` (bundle or ``.onnx`` -> Predictor),
:func:`gather_inputs` (INPUT paths -> ``(id, sample)`` pairs, streamed) and :func:`write_results`
(``(id, result)`` pairs -> table, JSON lines or CSV on a stream).

Table and CSV cells are :func:`printable`: a label or file name holding a newline, a terminal
escape sequence or another control character is written escaped, never raw (JSON lines escape
them as JSON does).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from trainfer.cli.common import (
    BATCH_SIZE,
    FiniteFloatRange,
    IntRange,
    check_output_apart,
    friendly_errors,
    trust_factory_option,
    trusted,
)
from trainfer.digest import sha256
from trainfer.errors import ExplanationsIncomplete, InputError, one_line
from trainfer.number_text import EXPECTED_FLOAT, parse_floats
from trainfer.serve.runtime_names import RUNTIMES

#: ``predict --explain``'s exit status when some examples could not be explained (each named in a warning
#: line) and every other PNG, and the predictions, were written: a partial result, as a verdict is (1).
EXIT_EXPLANATIONS_INCOMPLETE = 1

if TYPE_CHECKING:  # torch and the serving layer are imported when a command runs, never for --help
    from trainfer.serve.predictor import Predictor
    from trainfer.serve.preprocess import PreprocessSpec

FORMATS = ("table", "jsonl", "csv")
BUNDLE_RECORDS = ("manifest.json", "quantization.json", "runtime.json")


def load_predictor(
    bundle: str,
    batch_size: int,
    device: str,
    threshold: float | None,
    runtime: str | None = None,
    top_k: int | None = None,
) -> Predictor:
    """A :class:`Predictor` for a bundle directory or an exported ``.onnx`` file.

    A ``threshold`` (binary only) or ``top_k`` (classification and sequence only) that the bundle's
    task would silently ignore is refused (:class:`InputError`).
    """
    from trainfer.serve.predictor import Predictor
    from trainfer.serve.results import check_threshold, check_top_k

    overrides: dict[str, Any] = {"batch_size": batch_size, "device": device}
    if threshold is not None:
        overrides["threshold"] = threshold
    if runtime is not None:
        overrides["runtime"] = runtime
    predictor = Predictor.load(bundle, trust_factory=trusted(), **overrides)
    check_threshold(threshold, predictor.heads, name="--threshold")
    check_top_k(top_k, predictor.heads, name="--top-k")
    say_serving(predictor, bundle, runtime)
    return predictor


def say_serving(predictor: Predictor, bundle: str, runtime: str | None) -> None:
    """One line on stderr naming the form that serves ``bundle`` when it is not the bundle's plain PyTorch
    model (a recorded runtime, an int8 form, ``--runtime``), in ``trainfer serve``'s words: a default load
    follows ``runtime.json``, so the answers change after ``trainfer compile``, and this line says why.
    Stdout is left to the results (machine-readable formats stay clean); under torchrun rank 0 says it."""
    from trainfer.serve import distributed
    from trainfer.serve.served_model import load_origin, served_form, serving_words

    if served_form(predictor.model) is not None and distributed.is_main():
        click.echo(f"serving {bundle!r} on {serving_words(predictor.model, load_origin(bundle, runtime))}", err=True)


def gather_inputs(paths: Iterable[str], spec: PreprocessSpec) -> Iterator[tuple[str, Any]]:
    """``(id, sample)`` for every sample of every INPUT, in order and lazily.

    An image is one sample (id: its path); a ``.npy`` array gives one sample per row (id:
    ``path[i]``, memory-mapped); a CSV file one per data row (id: ``path:i``, 0-based).
    """
    from trainfer.serve.readers import IMAGE_SUFFIXES, check_regular_file, iter_csv

    for text in paths:
        path = Path(text)
        check_regular_file(path, text)
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            yield text, text
        elif suffix == ".npy":
            yield from _npy_rows(path, spec)
        elif suffix == ".csv":
            rows = (row for chunk in iter_csv(path, spec) for row in chunk.split(1))
            yield from ((f"{text}:{index}", row) for index, row in enumerate(rows))
        else:
            raise InputError(f"cannot read {text!r}: expected image files, a .npy file or a .csv file")


def _npy_rows(path: Path, spec: PreprocessSpec) -> Iterator[tuple[str, Any]]:
    import numpy as np

    from trainfer.serve.readers import read_npy

    array = read_npy(path, spec, mmap=True)
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


def flat_record(identifier: str, result: Any, summary: bool = False) -> dict[str, Any]:
    """A result's record as one level of columns: nested keys joined by ``.``, pairs as ``label=p``.

    ``summary``: the result's ``summary_record()`` where it has one (a sequence's text, score and
    lowest confidence, not its per-token and per-frame lists), for a table a person reads.
    """
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

    brief = getattr(result, "summary_record", None) if summary else None
    visit("", brief() if brief is not None else result.to_record())
    return flat


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as its Python escape.

    Bytes of a file name that are not UTF-8 (``\\udcff`` from the OS) become ``\\xff``; control
    characters (newline, carriage return, ESC of terminal sequences, NUL), line and paragraph
    separators and format characters (bidirectional overrides) become ``\\n``, ``\\x1b``, ``\\u202e``:
    a label can then neither start a row of its own nor act on the terminal. Printable text is
    returned as is.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no OS name decodes to: escaped below
        pass
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _escaped(value: Any) -> Any:
    return printable(value) if isinstance(value, str) else value


def write_results(pairs: Iterable[tuple[str, Any]], fmt: str, stream: IO[str]) -> int:
    """Write ``(id, result)`` pairs as ``table``, ``jsonl`` or ``csv``; return how many were written.

    No pair at all is an :class:`InputError` (there was nothing to predict).
    """
    if fmt == "jsonl":
        count = 0
        for identifier, result in pairs:
            stream.write(json.dumps({"id": identifier, **result.to_record()}, allow_nan=False) + "\n")
            count += 1
        return count or _nothing_predicted()
    rows = [{printable(k): _escaped(v) for k, v in flat_record(i, r, fmt == "table").items()} for i, r in pairs]
    if not rows:
        _nothing_predicted()
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


def _nothing_predicted() -> int:
    raise InputError("no inputs to predict: the inputs hold no image, .npy row or CSV row")


def model_digest(model: str) -> str:
    """sha256 of a bundle's metadata files (its manifest names its weights' sha256; its
    ``quantization.json`` its int8 file's) or of a ``.onnx`` file."""
    path = Path(model)
    files = [path] if path.is_file() else [path / name for name in BUNDLE_RECORDS if (path / name).is_file()]
    digest = hashlib.sha256()
    for file in files:
        # sha256 opens without blocking: a FIFO put there after the check is refused, never waited on
        digest.update(file.name.encode() + bytes.fromhex(sha256(file)))
    return digest.hexdigest()


def is_model(path: str) -> bool:
    """A bundle directory (holding ``manifest.json``) or an exported ``.onnx`` file: a model, not an input."""
    candidate = Path(path)
    return (candidate / "manifest.json").is_file() or (candidate.suffix == ".onnx" and candidate.is_file())


def split_models(bundle: str, arguments: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """BUNDLE and the models leading ``arguments`` (several: an ensemble), then the inputs."""
    count = next((i for i, argument in enumerate(arguments) if not is_model(argument)), len(arguments))
    return [bundle, *arguments[:count]], list(arguments[count:])


def parse_weights(text: str | None) -> list[float] | None:
    """``"1,2,0.5"`` -> ``[1.0, 2.0, 0.5]`` (numbers as :func:`trainfer.number_text.parse_floats` reads them;
    validated by the ensemble)."""
    if text is None:
        return None
    try:
        return parse_floats(text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers like 1,2,1, each {EXPECTED_FLOAT}; got {ascii(text)}",
            param_hint="'--weights'",
        ) from None


def explaining_predictor(predictor: Predictor, bundle: str, device: str) -> Predictor:
    """``predictor`` where it serves a torch model, else the bundle's float torch model (gradients need it):
    a compiled or int8 form (recorded in ``runtime.json`` or chosen by ``--runtime``) is never explained."""
    from torch import nn

    from trainfer.serve.predictor import Predictor

    if isinstance(predictor.model, nn.Module):
        return predictor
    return Predictor.load(bundle, trust_factory=trusted(), float_form=True, device=device)


def load_serving(
    models: list[str],
    weights: list[float] | None,
    batch_size: int,
    device: str,
    threshold: float | None,
    runtime: str | None = None,
    top_k: int | None = None,
):
    """One Predictor, or an ensemble of several (or of one with ``weights``), each checked by :func:`load_predictor`."""
    from trainfer.serve.predictor import Predictor

    predictors = [load_predictor(model, batch_size, device, threshold, runtime, top_k) for model in models]
    return predictors[0] if len(predictors) == 1 and weights is None else Predictor.ensemble(predictors, weights)


def _summary_line(summary: Any, batch_size: int) -> str:
    """What ``--out`` did (a :class:`~trainfer.serve.batch_predict.BatchSummary`), and why records were
    predicted again: a run resumes after the last whole batch, so a rerun of a finished file redoes its tail."""
    line = f"{summary.written} records written to {summary.path} after {summary.resumed} already there"
    if summary.repredicted:
        line += (
            f" ({summary.repredicted} found after the last whole batch of {batch_size} were predicted again: "
            "a run resumes in the batches of an uninterrupted one)"
        )
    return line


def batch_source(inputs: list[str], spec: PreprocessSpec) -> Any:
    """``(id, sample)`` pairs: one directory's images (ids relative to it), else :func:`gather_inputs`'s."""
    from trainfer.serve.batch_predict import iter_images

    return iter_images(inputs[0]) if len(inputs) == 1 and Path(inputs[0]).is_dir() else gather_inputs(inputs, spec)


@click.command("predict")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--top-k",
    type=IntRange(min=1),
    default=None,
    help="Report the k most probable classes (classification: at most the class count) or k hypotheses "
    "(sequence: at most 64).",
)
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=None, help="Decision threshold (binary tasks).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--batch-size", type=BATCH_SIZE, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA, then MPS, then CPU), cpu, cuda:N, mps.")
@click.option("--weights", default=None, help="Ensemble weights, one per bundle, comma-separated (default: equal).")
@click.option(
    "--runtime",
    type=click.Choice(["auto", "recorded", *RUNTIMES]),
    default=None,
    help="Serve on this runtime (auto: the fastest verified one, measured now; recorded: the bundle's "
    "runtime.json). Default: what the bundle's runtime.json records, as trainfer serve does; without one, "
    "its int8 form if it has one, else its PyTorch model.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Stream JSON lines to this file instead of stdout; re-running resumes it; sharded under torchrun.",
)
@click.option(
    "--explain", "explain_dir", type=click.Path(file_okay=False), default=None, help="Also write attribution PNGs here."
)
@trust_factory_option
@friendly_errors
def command(
    bundle: str,
    inputs: tuple[str, ...],
    top_k: int | None,
    threshold: float | None,
    fmt: str,
    batch_size: int,
    device: str,
    weights: str | None,
    runtime: str | None,
    out: str | None,
    explain_dir: str | None,
) -> None:
    """Predict INPUT... (image files, a directory of images, a .npy file or a CSV file) with the
    model of BUNDLE (or a .onnx file); several bundles before the inputs serve their ensemble.

    Under "torchrun --nproc_per_node N -m trainfer predict ... --out preds.jsonl" the ranks share
    the inputs and rank 0 writes the same file a single process would.
    """
    from trainfer.atomic import check_target
    from trainfer.serve import distributed
    from trainfer.serve.batch_predict import predict_to_jsonl, producer_path

    models, paths = split_models(bundle, inputs)
    if not paths:
        raise click.UsageError("expected INPUT... after the bundle(s)")
    if explain_dir is not None and (len(models) > 1 or weights is not None):
        raise click.UsageError("--explain takes one bundle, not an ensemble")
    if explain_dir is not None:  # its PNGs never land in the bundle or on an input file
        check_output_apart(explain_dir, *models, *(path for path in paths if Path(path).is_file()), option="--explain")
    if distributed.launched_by_torchrun():
        if out is None:
            raise click.UsageError("under torchrun give --out: the ranks share the work of one output file")
        rank_device = distributed.setup()
        device = str(rank_device) if device == "auto" else device
    try:
        if out is not None:
            check_target(out, "--out")  # before loading anything: /dev/stdout, a pipe, /dev/zero are refused
            check_target(producer_path(out), "--out's record")  # OUT.trainfer.json, written beside it
            # a bundle, or an input file: writing into a directory of images is fine
            check_output_apart(out, *models, *(path for path in paths if Path(path).is_file()), option="--out")
        if explain_dir is not None:
            from trainfer.analysis.attribution_files import check_file_targets

            check_target(explain_dir, "--explain", directory=True)
            check_file_targets(paths, explain_dir)  # the PNGs it will write, before predicting
        predictor = load_serving(models, parse_weights(weights), batch_size, device, threshold, runtime, top_k)
        if out is not None:
            producer = {
                "models": [model_digest(model) for model in models],
                "weights": parse_weights(weights),
                "threshold": threshold,
                "runtime": runtime,
            }
            source = batch_source(paths, predictor.preprocess_spec)
            summary = predict_to_jsonl(predictor, source, out, top_k=top_k, producer=producer)
            if distributed.is_main():
                click.echo(_summary_line(summary, predictor.batch_size), err=True)
        else:
            items = batch_source(paths, predictor.preprocess_spec)
            write_results(predictions(predictor, items, top_k), fmt, sys.stdout)
        if explain_dir is not None and distributed.is_main():
            from trainfer.analysis.attribution import explain_to_files

            try:
                explain_to_files(explaining_predictor(predictor, models[0], device), paths, explain_dir)
            except ExplanationsIncomplete as incomplete:  # the others are written: a partial result, not a usage error
                click.echo(f"error: {one_line(incomplete)}", err=True)
                sys.exit(EXIT_EXPLANATIONS_INCOMPLETE)
    finally:
        distributed.cleanup()
