"""One served model: a bundle's Predictor, checked before it is ready, and its protocol tensors.

The server's path through a Predictor is the Predictor's own, cut in two at the batch: each
request is checked alone (the preprocessing spec's checks, so a bad sample is that request's error,
named with that request's sample index); the batch of several requests is normalised, runs through
:meth:`~trainfer.serve.predictor.Predictor.scores`, is checked finite and has its top classes
ranked, once; and each request's rows become typed results
(:meth:`~trainfer.serve.predictor.Predictor.results_from_scores`) or protocol tensors. Normalising
is elementwise and ranking is row by row, so the answers are ``Predictor.predict``'s, within the
rounding that the batch composition changes in the forward.

An autoregressive sequence model has no scores to batch: the batch of several requests is decoded
whole (:meth:`~trainfer.serve.predictor.Predictor.generate`, the bundle's decoder settings), and each
request gets its rows' results. Decoding is independent of the batch's other items (each item's
search is its own; :meth:`ServedModel.check` compares a batch with its samples one by one before
the model is ready), so these are ``Predictor.predict``'s results within rounding. A request's
``top_k`` changes the search (it widens the beam), so it is the batcher's key: requests asking for
different ``top_k`` never share a batch.

Outputs, per head (prefixed ``"<head>."`` for multi-head bundles): classification ``probabilities``
``(N, C)``, ``index`` INT64 ``(N,)`` and ``label`` BYTES ``(N,)``; binary ``probability`` ``(N,)``,
``decision`` BOOL ``(N,)`` and ``label`` BYTES ``(N,)`` (the decision's label, ``"0"``/``"1"`` without
labels, as a classifier's unlabelled classes are named); regression ``values`` ``(N, ...)`` in target
units; sequence the decoded ``text``, ``tokens``, ``lengths``, ``score`` (and ``finished``, autoregressive) of
:mod:`trainfer.server.sequence_outputs`, and a CTC model's per-frame log-probabilities ``values``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainfer.analysis.attribution import Attributions
from trainfer.errors import EquivalenceError, InputError
from trainfer.numerics import relative_error, tolerance_for
from trainfer.serve.inputs import gather
from trainfer.serve.predictor import Predictor
from trainfer.serve.results import check_finite_scores, class_names
from trainfer.serve.runtime import RUNTIME_FILE
from trainfer.serve.served_model import load_origin, served_form, serving_words
from trainfer.server.protocol import datatype_of
from trainfer.server.sequence_outputs import VARIABLE, sequence_tensors

logger = logging.getLogger("trainfer.server")

#: Samples in the random batch that checks a model before it is ready.
CHECK_SAMPLES = 3

#: The input datatype a model's metadata names (bfloat16 models say FP32: the protocol's JSON and
#: numpy have no bfloat16, and any real datatype is cast by the preprocessing anyway).
_TORCH_DATATYPES = {torch.float16: "FP16", torch.float32: "FP32", torch.float64: "FP64"}

__all__ = ["CHECK_SAMPLES", "ServedModel", "load_model", "load_predictor"]


@dataclass
class ServedModel:
    """A named Predictor with what the protocol's metadata says about it (filled by :meth:`check`)."""

    name: str
    predictor: Predictor
    input_name: str = "input"
    outputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    #: Loads the bundle's torch model as a Predictor, for explanations when ``predictor`` serves a
    #: compiled or int8 form (gradients need the float torch model); None: explain ``predictor``.
    explainer_loader: Callable[[], Predictor] | None = None
    #: Why this form serves (e.g. "recorded in runtime.json"), said beside it in :meth:`serving`.
    origin: str = ""
    _explainer: Predictor | None = field(default=None, repr=False)
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Seconds of the fastest one-sample :meth:`compute` in :meth:`check` (None until checked).
    forward_seconds: float | None = None
    #: Each head's class count where it is a classification head (else None), from :meth:`check`: a
    #: ``top_k`` above it is refused before a request's body is read, for unlabelled heads too.
    classes: list[int | None] = field(default_factory=list)
    _labels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # see _label_table

    def explain(self, sample: Any, target: int | None = None) -> Attributions:
        """``sample`` explained (integrated gradients) on the bundle's float torch model: the served
        predictor's own when it serves one, else the model loaded once by ``explainer_loader``.
        ``target``: the class or output index to explain (None: the predicted class, or the one score)."""
        if isinstance(self.predictor.model, nn.Module) or self.explainer_loader is None:
            return self.predictor.explain(sample, target=target)
        with self._explainer_lock:
            if self._explainer is None:
                self._explainer = self.explainer_loader()
        return self._explainer.explain(sample, target=target)

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape = self.predictor.preprocess_spec.input_shape
        if shape is None:
            raise InputError(f"model {self.name!r}: the bundle records no input shape; serving needs one")
        return tuple(shape)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype :meth:`prepare` casts requests to: the model's input dtype."""
        return self.predictor.preprocess_spec.torch_dtype

    @property
    def input_datatype(self) -> str:
        """The protocol's name of :attr:`input_dtype` (any real datatype is accepted and cast)."""
        return _TORCH_DATATYPES.get(self.input_dtype, "FP32")

    def prepare(self, raw: Any) -> Tensor:
        """One request's samples checked as the Predictor checks them (shape, real and finite numbers:
        a bad sample is that request's error) and cast to the model's dtype; :meth:`compute` normalises
        them with the other requests of their batch (the same elementwise arithmetic, done once)."""
        spec = self.predictor.preprocess_spec
        batch = raw if isinstance(raw, np.ndarray) else gather(raw, spec)  # a protocol tensor is one batch already
        return spec.check_batch(batch).to(spec.torch_dtype)

    @property
    def generates(self) -> bool:
        """Whether the model is an autoregressive sequence model (decoded, not scored, per batch)."""
        return self.predictor.generates

    @property
    def decodes_answers(self) -> bool:
        """Whether turning its scores into answers decodes (CTC: a beam search per sample), which the
        server then runs off the event loop."""
        return self.predictor.task == "sequence" and not self.generates

    def key(self, top_k: int | None) -> Hashable:
        """A request's batcher key: its ``top_k`` when the model generates and it changes the search
        (None, the bundle's ``n_best``, and ``top_k == n_best`` decode alike: they share batches)."""
        decoder = self.predictor.decoder
        return top_k if self.generates and top_k != decoder.n_best else None

    def compute(self, batch: Tensor, top_k: int | None = None) -> list[Any]:
        """What the batcher runs on a batch of :meth:`prepare`'d requests, once normalised: the per-head
        :meth:`scores`, checked finite, followed by each classification head's top class
        (``[*scores, *top_classes]``, numpy arrays ``(N, ...)``: their rows are the requests' answers), or, for a
        model that generates, ``[results]``: the batch decoded with the bundle's settings (``top_k``: the Predictor's).

        A non-finite score raises :class:`~trainfer.errors.NonFiniteError` for the whole batch (the
        batcher then runs its requests one by one, so that only the request it comes from hears it).
        """
        batch = self.predictor.preprocess_spec.normalize(batch)
        if self.generates:
            return [self.predictor.generate(batch, top_k)]
        scores = self.finite(self.scores(batch))
        # numpy: each request's rows are cheap views (and its column of indices is cut at a third of torch's cost)
        top_classes = [
            s.topk(1, dim=1).indices.numpy()[:, 0] for s, h in zip(scores, self.predictor.heads) if _ranked(h)
        ]
        return [s.numpy() for s in scores] + top_classes

    def scores(self, batch: Tensor) -> list[Tensor]:
        """Per-head scores of a normalised batch, on the CPU."""
        scores = self.predictor.scores(batch)
        per_head = list(scores.values()) if isinstance(scores, dict) else [scores]
        return [s.detach().cpu() for s in per_head]

    def finite(self, per_head: list[Tensor]) -> list[Tensor]:
        """``per_head`` when every score is finite (else :class:`~trainfer.errors.NonFiniteError`)."""
        check_finite_scores(per_head, self.predictor.heads)
        return per_head

    def results(self, rows: list[Any], top_k: int | None, threshold: float | None = None) -> list[Any]:
        """Typed results of one request's rows of :meth:`compute` (decoded already when the model generates);
        ``threshold``: a binary head's decision threshold for this request (None: the Predictor's)."""
        if self.generates:
            return list(rows[0])
        scores = [torch.from_numpy(column) for column in rows[: len(self.predictor.heads)]]
        return self.predictor.results_from_scores(scores, top_k, threshold)

    def tensors(self, rows: list[Any]) -> dict[str, np.ndarray]:
        """The protocol outputs of one request's rows of :meth:`compute`, by name (sequences decoded
        with the bundle's settings); the same numbers as :meth:`results` gives, read from the rows."""
        if self.predictor.task == "sequence":
            decoded = sequence_tensors(self.results(rows, top_k=None), self.generates)
            return decoded if self.generates else {**decoded, "values": rows[0]}
        heads = self.predictor.heads
        top_classes = iter(rows[len(heads) :])
        tensors: dict[str, np.ndarray] = {}
        for head, values in zip(heads, rows[: len(heads)], strict=True):
            prefix = f"{head.name}." if self.predictor.multi_head else ""
            if _ranked(head):
                index = next(top_classes)
                tensors[prefix + "probabilities"] = values
                tensors[prefix + "index"] = index
                tensors[prefix + "label"] = self._label_table(head, values.shape[1])[index]
            elif head.task == "binary":
                tensors[prefix + "probability"] = values
                decision = values.astype(np.float64) >= self.predictor.threshold  # as in Python
                tensors[prefix + "decision"] = decision
                tensors[prefix + "label"] = self._label_table(head, 2)[decision.astype(np.intp)]
            else:
                tensors[prefix + "values"] = values
        return tensors

    def _label_table(self, head: Any, classes: int) -> np.ndarray:
        """The encoded label of each class of ``head`` (the typed results' names), indexable by class
        (a binary head's two: negative, positive)."""
        table = self._labels.get(str(head.name))
        if table is None or len(table) != classes:
            names = class_names(head.labels, classes)
            table = self._labels[str(head.name)] = np.array([name.encode() for name in names], dtype=object)
        return table

    def check(self) -> None:
        """Run a random batch, whole and sample by sample: finite, and the same answers within tolerance.

        Fills the output metadata and :attr:`classes`. Raises :class:`~trainfer.errors.EquivalenceError` when the
        batched answers differ from the single ones beyond the dtype's tolerance.
        """
        generator = torch.Generator().manual_seed(0)
        raw = torch.rand(CHECK_SAMPLES, *self.input_shape, generator=generator, dtype=torch.float64)
        whole = self.compute(self.prepare(raw))
        single = [self._timed(self.prepare(raw[i : i + 1])) for i in range(CHECK_SAMPLES)]
        if self.generates:  # the same tokens, and scores within the tolerance
            self._compare(whole[0], [rows[0][0] for rows in single])
        else:
            for h, scores in enumerate(whole[: len(self.predictor.heads)]):
                self._agree(torch.from_numpy(np.concatenate([rows[h] for rows in single])), torch.from_numpy(scores))
            self.classes = [
                scores.shape[1] if head.task == "classification" else None
                for head, scores in zip(self.predictor.heads, whole, strict=False)
            ]
        self.outputs = {
            name: (datatype_of(array.dtype), [-1, *(-1 if name in VARIABLE else d for d in array.shape[1:])])
            for name, array in self.tensors(whole).items()
        }

    def _timed(self, batch: Tensor) -> list[Any]:
        """:meth:`compute` of ``batch``, its seconds kept in :attr:`forward_seconds` when the fastest so far."""
        start = time.perf_counter()
        rows = self.compute(batch)
        self.forward_seconds = min(self.forward_seconds or math.inf, time.perf_counter() - start)
        return rows

    def _compare(self, together: list[Any], alone: list[Any]) -> None:
        """Refuse decoded sequences that change with the batch (their tokens, or scores beyond tolerance)."""
        if [r.tokens for r in together] != [r.tokens for r in alone]:
            raise EquivalenceError(
                f"model {self.name!r}: a batch of {CHECK_SAMPLES} decodes to other tokens than its samples "
                "one by one: not served"
            )
        dtype = self.predictor.preprocess_spec.torch_dtype
        alone_scores, together_scores = (
            torch.tensor([r.score for r in rs], dtype=torch.float64) for rs in (alone, together)
        )
        self._agree(alone_scores, together_scores, tolerance_for(dtype))

    def _agree(self, alone: Tensor, together: Tensor, tolerance: float | None = None) -> None:
        tolerance = tolerance_for(together.dtype) if tolerance is None else tolerance
        error = relative_error(alone.double(), together.double())
        if error > tolerance:
            raise EquivalenceError(
                f"model {self.name!r}: a batch of {CHECK_SAMPLES} and its samples one by one differ by "
                f"{error:.3g} relative (tolerance {tolerance:.1g}): not served"
            )

    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata: name, versions, platform, inputs and outputs."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "trainfer",
            "inputs": [{"name": self.input_name, "datatype": self.input_datatype, "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in self.outputs.items()],
            "parameters": {
                "task": self.predictor.task,
                "labels": self.predictor.labels,
                **self._runtime(),
                **self._decoder(),
            },
        }

    def _runtime(self) -> dict[str, str]:
        """``{"runtime": "<runtime>/<dtype>"}`` when a compiled form serves (a ``CompiledModel``), else ``{}``."""
        form = served_form(self.predictor.model)
        return {"runtime": form} if form is not None else {}

    def serving(self) -> str:
        """What serves, for the ready log line (:func:`~trainfer.serve.served_model.serving_words`: e.g.
        ``"onnxruntime/float32, recorded in runtime.json"``, or the bundle's PyTorch model)."""
        return serving_words(self.predictor.model, self.origin)

    def _decoder(self) -> dict[str, Any]:
        """``{"decoder": settings}`` for a sequence bundle (its recorded decoder settings), else ``{}``."""
        decoder = self.predictor.decoder
        return {} if decoder is None else {"decoder": decoder.to_dict()}


def _ranked(head: Any) -> bool:
    """Whether ``head``'s answers name a top class (:meth:`ServedModel.compute` ranks it once per batch)."""
    return head.task == "classification"


def load_model(
    name: str,
    path: str | os.PathLike[str],
    *,
    runtime: str | None,
    trust_factory: bool,
    max_batch: int,
    search: dict[str, Any] | None = None,
    write_runtime: bool = False,
) -> ServedModel:
    """Load the bundle at ``path`` under the usual trust rules and check it (see :meth:`ServedModel.check`).

    ``search`` (the keyword arguments of :func:`trainfer.serve.gated.compile`): first run that runtime
    search on the bundle (:func:`compiled_form`) and serve the form it chose (``runtime`` must then be
    ``None`` or ``"auto"``).
    """
    predictor, origin = load_predictor(name, path, runtime, trust_factory, max_batch, search, write_runtime)
    model = ServedModel(
        name,
        predictor,
        explainer_loader=lambda: Predictor.load(path, trust_factory=trust_factory, float_form=True),
        origin=origin,
    )
    model.check()
    return model


def load_predictor(
    name: str,
    path: str | os.PathLike[str],
    runtime: str | None,
    trust_factory: bool,
    max_batch: int,
    search: dict[str, Any] | None = None,
    write_runtime: bool = False,
) -> tuple[Predictor, str]:
    """The Predictor that serves the bundle at ``path`` as model ``name`` (see :func:`load_model`), and why that
    form serves (:func:`~trainfer.serve.served_model.load_origin`)."""
    overrides: dict[str, Any] = {"batch_size": max_batch}
    served: Any = runtime
    origin = load_origin(path, runtime)
    if search is not None:
        if runtime not in (None, "auto"):
            raise InputError(f"model {name!r}: the start-up search chooses the runtime; got runtime {runtime!r} too")
        served, origin = compiled_form(name, path, search, write_runtime), "chosen by the start-up search"
    elif runtime is None and (Path(path) / RUNTIME_FILE).is_file():
        served = "recorded"  # the runtime trainfer.compile chose and recorded (gated int8/bf16 included)
    if served is not None:
        overrides["runtime"] = served
    return Predictor.load(path, trust_factory=trust_factory, **overrides), origin


def compiled_form(name: str, path: str | os.PathLike[str], search: dict[str, Any], write_runtime: bool) -> Any:
    """The form :func:`trainfer.serve.gated.compile` chooses for the bundle at ``path`` with ``search``
    (what ``trainfer compile`` would record), its progress and every candidate's figures logged.

    ``write_runtime``: also record it in the bundle (:func:`~trainfer.serve.gated.save_compiled`, atomic
    writes); otherwise the bundle is left as it was and the record lives in the log and the model's metadata.
    """
    from trainfer.serve import gated
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.source import check_searchable

    what = f"model {name!r}: the start-up runtime search (compile=)"
    check_searchable(read_manifest(path), search.get("gate_data") is not None, what, "serve it without a search")
    kinds = gated.searched_kinds(search)
    logger.info("model %r: searching the fastest of the %s forms of %s (not ready until done)", name, kinds, path)
    compiled = gated.compile(path, runtime="auto", **search)
    record = compiled.record
    for line in record.table().splitlines():  # a "warning: " line (untrusted latencies) at warning level
        logger.log(logging.WARNING if line.startswith("warning: ") else logging.INFO, "model %r: %s", name, line)
    note = gated.choice_note(record, search.get("gate_data") is not None)
    if note:
        logger.info("model %r: %s", name, note)
    if write_runtime:
        logger.info("model %r: recorded in %s", name, gated.save_compiled(path, compiled))
    logger.info("model %r: serving %s/%s, chosen by the search", name, record.runtime, record.dtype)
    return compiled
