"""Batch prediction over a directory of images or a CSV of rows: streamed, resumable, sharded by rank.

``predict_to_jsonl(predictor, source, out)`` writes one JSON line per input, in input order, each
``{"id": <input id>, **result.to_record()}`` where the id is the image's path relative to the
directory, or ``"<csv path>:<0-based row>"``. Guarantees:

* **Bounded memory.** Inputs are read lazily, in windows of ``W * B`` (``W`` ranks, batch size
  ``B``): at most one window of inputs (and their results) is held, whatever the input count.
* **Resumable.** An existing ``out`` is read first: its records must be the results of the first
  inputs, in order (checked id by id), and those inputs are skipped. The records after the last
  whole batch — a truncated last line from a crash mid-write, a last partial batch — are cut off
  and predicted again (at most ``B - 1`` inputs). Every window's lines are flushed before the
  next window is read.
* **Sharded under torchrun.** Rank ``r`` predicts the ``r``-th batch of ``B`` consecutive inputs
  of each window and serialises its lines; all lines are gathered and rank 0 appends them in
  input order. Batches start at multiples of ``B`` (also when resuming), so each is made of the
  same inputs as in one uninterrupted process: the file is byte for byte that process's, whatever
  the number of ranks or interruptions, for the same ``B`` (kernels may round differently per
  batch size).
* **Resumed only by what wrote it.** ``OUT.trainfer.json`` records what produces the records
  (the model's digest, ``top_k``, the record format, and what serves each model on which device:
  :func:`serving`; the CLI adds the bundle files' digest, threshold, runtime and ensemble weights).
  A non-empty ``out`` without it, or whose record differs, is refused (:class:`InputError`) instead
  of appended to. A record an earlier trainfer wrote, without what serves, resumes on the CPU only.
* **Regular files only.** An ``out`` that exists and is not a regular file (``/dev/stdout``, a
  pipe, ``/dev/zero``, a directory) is refused before anything reads or writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from trainfer.atomic import atomic_file, check_target
from trainfer.errors import InputError, MissingFileError, WriteError
from trainfer.jsonfile import MAX_JSON_BYTES, parse_json
from trainfer.readfile import irregular
from trainfer.serve import distributed
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import IMAGE_SUFFIXES, iter_csv
from trainfer.serve.served_model import served_form

Item = tuple[Any, Any]  # (id written in the record, input handed to the predictor)
PRODUCER_SUFFIX = ".trainfer.json"
MAX_PRODUCER_BYTES = 1 << 16
#: The longest record line a resumed ``out`` may hold, as any JSON trainfer reads: 16 MiB (a line of
#: ``top_k`` classes or of a regression's values is far shorter).
MAX_RECORD_BYTES = MAX_JSON_BYTES
_BLOCK = 1 << 20  # bytes read at a time when counting lines


@dataclass(frozen=True)
class BatchSummary:
    """What one run did: ``written`` new records after ``resumed`` records already in ``path``.

    ``repredicted``: records ``path`` held past its last whole batch, cut and predicted again (counted
    in ``written``): a rerun of a finished file whose inputs are fewer than a batch redoes them all.
    """

    path: Path
    resumed: int
    written: int
    repredicted: int = 0


def iter_images(directory: str | os.PathLike[str]) -> Iterator[Item]:
    """Image files under ``directory`` (recursively, sorted by name), as ``(relative path, path)``.

    Only one directory's names are listed at a time; no image is opened here.
    An :class:`InputError` ends the listing if it found no image at all (an empty directory).
    """
    root = Path(directory)
    found = False
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(folder, name)
                found = True
                yield path.relative_to(root).as_posix(), str(path)
    if not found:
        raise InputError(
            f"no image files under {str(root)!r}: expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        )


def iter_csv_rows(path: str | os.PathLike[str], spec: PreprocessSpec) -> Iterator[Item]:
    """Rows of a CSV file with a header, as ``("path:i", raw (1, F) row)`` (``i`` 0-based), read in chunks.

    The ids are those of ``trainfer predict``'s output; the columns are picked by ``spec.columns``
    (see :func:`trainfer.serve.readers.iter_csv`).
    """
    rows = (row for chunk in iter_csv(Path(path), spec) for row in chunk.split(1))
    yield from ((f"{path}:{index}", row) for index, row in enumerate(rows))


def iter_source(source: str | os.PathLike[str], spec: PreprocessSpec) -> Iterator[Item]:
    """A directory of images or a ``.csv`` file (columns as ``spec`` says), streamed as ``(id, input)``."""
    path = Path(source)
    if path.is_dir():
        return iter_images(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return iter_csv_rows(path, spec)
    if not path.exists():
        raise MissingFileError(f"batch input {str(path)!r} does not exist (expected a directory of images or a .csv)")
    raise InputError(f"batch input {str(path)!r} is neither a directory of images nor a .csv file")


def count_records(out: str | os.PathLike[str]) -> int:
    """How many complete (newline-terminated) lines ``out`` holds; 0 if it does not exist. Read in blocks:
    an unterminated last line (a crash mid-write, or a forged file) is never held whole."""
    path = Path(out)
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(_BLOCK), b""))


def keep_records(out: str | os.PathLike[str], keep: int) -> None:
    """Cut ``out`` after its first ``keep`` lines (a missing file is left missing); a line longer than
    :data:`MAX_RECORD_BYTES` among them is an :class:`InputError`."""
    path = Path(out)
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        end = sum(len(line) for line in _lines(handle, keep, path))
        handle.truncate(end)


def _lines(handle: BinaryIO, count: int, out: Path) -> Iterator[bytes]:
    """The first ``count`` lines of ``handle`` (the file ``out``), each read whole only when at most
    :data:`MAX_RECORD_BYTES`: a longer one is an :class:`InputError` naming its number."""
    for number in range(1, count + 1):
        line = handle.readline(MAX_RECORD_BYTES + 1)
        if len(line) > MAX_RECORD_BYTES:
            raise InputError(
                f"{str(out)!r} line {number} is longer than {MAX_RECORD_BYTES} bytes "
                "(trainfer.serve.batch_predict.MAX_RECORD_BYTES): not a prediction record"
            )
        yield line


def _record_ids(out: Path, count: int) -> Iterator[Any]:
    """The ``id`` of the first ``count`` lines of ``out``, streamed, each parsed with its length and nesting
    bounded first (:func:`~trainfer.jsonfile.parse_json`: the file is untrusted); an unreadable line is named."""
    if not count:
        return
    with open(out, "rb") as handle:
        for number, line in enumerate(_lines(handle, count, out), start=1):
            try:
                yield parse_json(line, "the line", max_bytes=MAX_RECORD_BYTES)["id"]
            except (InputError, KeyError, TypeError) as error:
                reason = f": {error}" if isinstance(error, InputError) else ""
                raise InputError(
                    f"{str(out)!r} line {number} is not a prediction record with an 'id'{reason}"
                ) from None


def _skip_done(items: Iterator[Item], out: Path, done: int, keep: int) -> list[Item]:
    """Advance ``items`` past the ``done`` inputs recorded in ``out``, checking every id.

    Returns the inputs after the first ``keep``: they are predicted again.
    """
    again = []
    for number, expected in enumerate(_record_ids(out, done), start=1):
        item = next(items, None)
        if item is None:
            raise InputError(f"{str(out)!r} holds {done} records but the input has only {number - 1}")
        if item[0] != expected:
            raise InputError(
                f"{str(out)!r} was written for other inputs: line {number} is for {expected!r}, "
                f"input {number} is {item[0]!r} (use another --out or delete it)"
            )
        if number > keep:
            again.append(item)
    return again


def producer_path(out: str | os.PathLike[str]) -> Path:
    """Where the record of what produces ``out`` is kept: ``OUT.trainfer.json`` beside it."""
    out = Path(out)
    return out.with_name(out.name + PRODUCER_SUFFIX)


def model_digest(predictor: Any) -> str:
    """sha256 of what ``predictor`` serves: a PyTorch model's state (names, dtypes, shapes, bytes) and
    heads; an ensemble's members' digests and weights; another engine's type and heads only."""
    digest = hashlib.sha256()
    members = getattr(predictor, "members", None)
    if members is not None:
        weights = torch.as_tensor(predictor.weights, dtype=torch.float64).tolist()
        digest.update(json.dumps([[model_digest(m) for m in members], weights]).encode())
        return digest.hexdigest()
    model = getattr(predictor, "model", predictor)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    digest.update(json.dumps([h.to_dict() for h in getattr(predictor, "heads", [])], default=str).encode())
    digest.update(repr(getattr(predictor, "threshold", None)).encode())
    if isinstance(model, torch.nn.Module):
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def serving(predictor: Any) -> dict[str, list[str]]:
    """What answers for ``predictor``, one entry per model (an ensemble's members in order): ``forms``, each a
    compiled or int8 form (:func:`~trainfer.serve.served_model.served_form`, ``"onnxruntime/float32"``) or
    ``"the PyTorch model"`` (another engine: its type), and ``devices``, the type of device each runs on
    (``"cpu"``, ``"cuda"``: not its index, which differs by rank under torchrun). The same bundle serves other
    answers elsewhere: a default load serves its ``runtime.json`` on the CPU, ``device="cuda"`` its PyTorch model
    on the GPU."""
    members = getattr(predictor, "members", None) or [predictor]
    models = [getattr(member, "model", member) for member in members]
    return {
        "forms": [
            served_form(model) or ("the PyTorch model" if isinstance(model, torch.nn.Module) else type(model).__name__)
            for model in models
        ],
        "devices": [torch.device(getattr(member, "device", "cpu")).type for member in members],
    }


def producer_record(predictor: Any, top_k: int | None, producer: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``OUT.trainfer.json`` records: the record format, ``top_k``, ``producer`` (default: the
    predictor's :func:`model_digest`), and what serves it where (:func:`serving`)."""
    made_by = {"model": model_digest(predictor)} if producer is None else producer
    return {"format": "trainfer-predictions", "records": "jsonl", "top_k": top_k, **made_by, **serving(predictor)}


def _check_producer(out: Path, expected: dict[str, Any]) -> None:
    """Refuse to resume the non-empty ``out`` unless its recorded producer is ``expected``."""
    path = producer_path(out)
    again = "use another --out or delete it"
    kind = irregular(path, "the record")
    if kind:
        raise InputError(f"cannot resume {str(out)!r}: {path.name!r} is {kind}, not a record of what wrote it; {again}")
    if not path.is_file():
        raise InputError(f"cannot resume {str(out)!r}: nothing records what wrote it (no {path.name!r}); {again}")
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_PRODUCER_BYTES + 1)
        recorded = json.loads(text) if len(text) <= MAX_PRODUCER_BYTES else None
    except (OSError, ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise InputError(f"cannot resume {str(out)!r}: {path.name!r} is not a record of what wrote it; {again}")
    recorded = _with_serving(out, recorded, expected, again)
    differences = [
        f"{key} {recorded.get(key)!r}, not {expected.get(key)!r}"
        for key in sorted(recorded.keys() | expected.keys())
        if recorded.get(key) != expected.get(key)
    ]
    if differences:
        raise InputError(f"cannot resume {str(out)!r}: it was written with {'; '.join(differences)}; {again}")


def _with_serving(out: Path, recorded: dict[str, Any], expected: dict[str, Any], again: str) -> dict[str, Any]:
    """``recorded``, or when an earlier trainfer wrote it (without :func:`serving`'s keys), ``recorded`` taken
    as begun as ``expected`` serves when that is all on the CPU, where the bundle files and ``--runtime``
    (recorded) decide what serves; on another device it is refused: nothing says the file was begun there."""
    if any(key in recorded for key in ("forms", "devices")):
        return recorded
    devices = expected.get("devices", [])
    if any(device != "cpu" for device in devices):
        raise InputError(
            f"cannot resume {str(out)!r}: its record, from an earlier trainfer, does not say on which device it was "
            f"begun, and this run serves on {', '.join(devices)}: resume it on the CPU (--device cpu), or {again}"
        )
    return {**recorded, "forms": expected.get("forms"), "devices": devices}


def _write_producer(out: Path, producer: dict[str, Any]) -> None:
    with atomic_file(producer_path(out)) as tmp:
        tmp.write_text(json.dumps(producer, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _resume(
    items: Iterator[Item], out: Path, batch_size: int, producer: dict[str, Any]
) -> tuple[int, int, Iterator[Item]]:
    """Skip ``out``'s records on every rank, back to the last whole batch; return their count, the count
    of records cut after it (predicted again), and the rest.

    Rank 0 checks ``out`` is a regular file written by ``producer`` and every complete record's
    id, then cuts ``out`` after the last whole batch (a truncated last line goes too): the inputs
    after it are predicted again, in the same batches as an uninterrupted run.
    """
    outcome: Any = None
    again: list[Item] = []
    if distributed.is_main():
        try:
            if not out.parent.is_dir():
                raise MissingFileError(f"--out directory {str(out.parent)!r} does not exist")
            check_target(out, "--out")
            if out.exists() and out.stat().st_size:
                _check_producer(out, producer)
            done = count_records(out)
            kept = done - done % batch_size
            again = _skip_done(items, out, done, kept)
            keep_records(out, kept)
            outcome = (kept, done - kept)
            _write_producer(out, producer)
        except (ValueError, OSError) as error:
            outcome = error
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    kept, cut = outcome
    if not distributed.is_main():
        next(itertools.islice(items, kept, kept), None)
    return kept, cut, itertools.chain(again, items)


def _record_lines(predictor: Any, batch: list[Item], top_k: int | None) -> str:
    """One JSON line per input of ``batch``: its id, then its result's record."""
    results = predictor.predict([item for _, item in batch], top_k=top_k)
    return "".join(
        json.dumps({"id": key, **result.to_record()}, allow_nan=False) + "\n"
        for (key, _), result in zip(batch, results, strict=True)
    )


def _predict_window(predictor: Any, window: list[Item], batch_size: int, top_k: int | None) -> list[str]:
    """This rank's batch of ``window`` predicted, then every rank's lines in rank (= input) order.

    An error on any rank is raised on every rank, so none is left waiting in a collective.
    """
    start = distributed.rank() * batch_size
    mine = window[start : start + batch_size]
    try:
        lines: str | Exception = _record_lines(predictor, mine, top_k) if mine else ""
    except Exception as error:  # re-raised below on every rank
        lines = error
    gathered = distributed.all_gather_object((len(window), lines))
    for _, part in gathered:
        if isinstance(part, Exception):
            raise part
    if len({count for count, _ in gathered}) > 1:
        raise RuntimeError("ranks read different inputs: the source changed while being predicted")
    return [part for _, part in gathered]


def _append(handle: Any, text: str, out: Path) -> None:
    """Write and flush ``text``; an ``OSError`` (disk full) becomes a :class:`WriteError` naming ``out``.

    Whatever reached the file stays resumable: the next run cuts it back to its last whole batch.
    """
    try:
        handle.write(text)
        handle.flush()
    except OSError as error:
        raise WriteError(f"cannot write {str(out)!r}: {error.strerror or error}") from error


def predict_to_jsonl(
    predictor: Any,
    source: str | os.PathLike[str] | Iterable[Item],
    out: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    top_k: int | None = None,
    progress: bool = True,
    producer: dict[str, Any] | None = None,
) -> BatchSummary:
    """Predict every input of ``source`` into the JSON-lines file ``out`` (see the module docstring).

    ``predictor`` is a :class:`trainfer.Predictor` or an ensemble (anything with
    ``predict(inputs, top_k=...)`` returning results with ``to_record()``); ``source`` is a
    directory of images, a ``.csv`` file, or an iterable of ``(id, input)`` pairs. Under torchrun
    every rank calls this with the same arguments; only rank 0 writes ``out``. ``producer``
    (JSON values) identifies the model for resuming (default: :func:`model_digest`).
    """
    out = Path(out)
    batch_size = batch_size or predictor.batch_size
    made_by = producer_record(predictor, top_k, producer)
    items = iter(iter_source(source, predictor.preprocess_spec) if isinstance(source, str | os.PathLike) else source)
    resumed, repredicted, items = _resume(items, out, batch_size, made_by)
    window_size = batch_size * distributed.world_size()
    written = 0
    main = distributed.is_main()
    with (
        open(out, "a", encoding="utf-8") if main else contextlib.nullcontext() as handle,
        tqdm(desc="predict", unit="input", initial=resumed, disable=None if main and progress else True) as bar,
    ):
        while True:  # every rank reads every window, so all stop together, on the first empty one
            window = list(itertools.islice(items, window_size))
            parts = _predict_window(predictor, window, batch_size, top_k)
            if not window:
                return BatchSummary(out, resumed, written, repredicted)
            if main:
                _append(handle, "".join(parts), out)
            written += len(window)
            bar.update(len(window))
