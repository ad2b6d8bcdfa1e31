"""The Predictor: from raw inputs to typed, correct predictions, with modes handled for you.

Each batch goes through three timed stages:

* **preprocess** — inputs (tensors, arrays, lists, image/CSV/.npy paths) are loaded, validated and
  normalised by the :class:`~trainfer.serve.preprocess.PreprocessSpec`;
* **forward** — the model runs in eval mode under ``inference_mode`` (see *Threads* below);
* **postprocess** — each head's output becomes scores exactly once according to its output kind
  (:func:`trainfer.serve.outputs.to_scores`: softmax of logits, probabilities as they are, exp of
  log-probabilities; sigmoid for binary; regression values mapped back by the target scaling), then
  typed results.

Input is consumed in batches of ``batch_size``, in order, so :meth:`Predictor.predict_iter` streams
any iterable in bounded memory. An optional LRU cache keyed by a hash of each preprocessed sample
skips the forward pass for repeated samples.

Numbers: a batch that is not finite after the cast to the model's dtype and the normalisation
(``1e300`` as float32) is refused, and so is a model output holding NaN or inf: a
:class:`~trainfer.errors.NonFiniteError` names the input samples (0-based, across the batches).

Threads: one Predictor may be shared by any number of threads (a server's request threads).
A model the Predictor owns — built by :meth:`Predictor.load`, or its own copy moved to
``device`` — is put in eval mode once, at construction, and never switched again: calls run in
parallel. A model passed in by the caller is never switched for good: if every submodule is in
eval, calls run in parallel as they are; otherwise each batch switches it to eval and back
holding a lock of that model (:func:`trainfer.modes.contexts.shared_inference`), so such calls run one at
a time. The cache and the timings are updated under a lock. What is not synchronised: the
caller changing the model (its weights or modes) while predictions run.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainfer.errors import InputError, InputTypeError, OutputKindWarning
from trainfer.modes.contexts import shared_inference
from trainfer.serve.batching import sample_count, timed_batches
from trainfer.serve.devices import pick_device
from trainfer.serve.ensemble import Ensemble, Member
from trainfer.serve.inputs import gather, iter_raw
from trainfer.serve.outputs import Head, Selector, check_output_kind, resolve_heads, select_output, to_scores
from trainfer.serve.predictor_setup import autoregressive, decoder_for, generates, head_settings, placed, spec_for
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.results import (
    MultiHeadResult,
    Result,
    Timings,
    binary_results,
    check_finite_scores,
    check_top_k,
    classification_results,
    regression_results,
)
from trainfer.serve.score_cache import ScoreCache
from trainfer.serve.served_model import open_served
from trainfer.validate import check_integer, check_keywords, check_number, check_path, check_type, given

if TYPE_CHECKING:
    from trainfer.serve.runtime_record import RuntimeRecord
    from trainfer.serve.sequence import DecoderSettings

logger = logging.getLogger("trainfer")
__all__ = ["Predictor", "pick_device"]


# --------------------------------------------------------------------------- predictor
class Predictor:
    """Serve a model: validate and preprocess inputs, run it safely in batches, return typed results.

    ``model`` is an ``nn.Module`` (never modified: a copy is moved when ``device`` differs from
    where its weights are) or any callable batch -> output (e.g. an ONNX Runtime session wrapper).
    The predictor is safe to share between threads (see the module docstring): a model in
    eval mode (or one :meth:`load` built) serves calls in parallel, one in training mode one
    batch at a time.
    ``output`` picks the prediction among tuple/dict outputs; ``heads`` (name -> task) serves
    several at once. ``output_kind`` (``logits``/``probabilities``/``log_probabilities``, or a dict
    per head) is detected from the traced eval graph when not given. ``runtime`` (a name, ``"auto"``
    or a :class:`~trainfer.serve.runtime.RuntimeRecord`)
    serves the model through :func:`trainfer.serve.runtime.compile`.
    """

    def __init__(
        self,
        model: nn.Module | Any,
        *,
        task: str = "classification",
        labels: Any = None,
        preprocess: PreprocessSpec | Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        output_kind: str | Mapping[Any, str] | None = None,
        output: Selector = None,
        heads: Mapping[Any, str] | None = None,
        threshold: float = 0.5,
        cache_size: int = 0,
        runtime: str | RuntimeRecord | None = None,
        decoder: DecoderSettings | Mapping[str, Any] | None = None,
    ):
        if isinstance(labels, str | bytes) or not isinstance(labels, Iterable | None):
            raise InputTypeError(
                f"labels must be a list of class names, a dict by head name or None; got {given(labels)}"
            )
        self._place(model, preprocess, device, batch_size, threshold, cache_size)
        if output_kind is None and task == "sequence" and autoregressive(decoder):
            output_kind = "log_probabilities"  # what step() returns (StepModel); no single forward to trace
        self._serve(self._resolve_heads(task, labels, output, heads, output_kind), runtime, decoder)

    @classmethod
    def _recorded(
        cls,
        model: Callable[[Tensor], Any],
        heads: list[Head],
        *,
        runtime: str | RuntimeRecord | None = None,
        decoder: DecoderSettings | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Predictor:
        """A predictor serving ``heads`` as a bundle records them (resolved when it was saved, not again).

        ``options``: the constructor's ``preprocess``, ``device``, ``batch_size``, ``threshold``, ``cache_size``.
        """
        predictor = cls.__new__(cls)
        predictor._place(model, **options)
        predictor._serve(heads, runtime, decoder)
        return predictor

    def _place(
        self,
        model: Any,
        preprocess: PreprocessSpec | Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        threshold: float = 0.5,
        cache_size: int = 0,
    ) -> None:
        """Validate the settings and place the model on its device (the heads come next, :meth:`_serve`)."""
        if not callable(model):
            raise InputTypeError(f"model must be an nn.Module or a callable; got {type(model).__name__}")
        self.batch_size = check_integer("batch_size", batch_size, minimum=1)
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0)
        self._cache_size = check_integer("cache_size", cache_size, minimum=0)
        check_type("preprocess", preprocess, PreprocessSpec | Mapping | None, "a PreprocessSpec, a dict or None")
        self.device = pick_device(device) if isinstance(model, nn.Module) else torch.device("cpu")
        self.model = placed(model, self.device)
        self.preprocess_spec = spec_for(self.model, preprocess)

    def _serve(self, heads: list[Head], runtime: Any, decoder: Any) -> None:
        """Serve ``heads``: the decoder, the cache and timings, and the runtime the model is compiled for."""
        self.heads = heads
        self.multi_head = self.heads[0].name is not None  # named heads come from heads={...}
        self.decoder = decoder_for(self.heads, decoder)
        self.generates = generates(self.decoder, self._cache_size, runtime)  # autoregressive: decoding runs the model
        self.timings = Timings()
        self._checked = False
        self._lock = threading.Lock()  # the cache and the timings
        self._cache = ScoreCache(self._cache_size, self._lock) if self._cache_size else None
        if runtime is not None:  # served by trainfer.compile from here on (on the CPU)
            from trainfer.serve.runtime import compile_for

            self.model = compile_for(self.model, runtime, self.preprocess_spec, self.batch_size)
            self.device = _CPU

    def _resolve_heads(self, task: str, labels: Any, output: Selector, heads: Any, output_kind: Any) -> list[Head]:
        if not isinstance(self.model, nn.Module):
            return resolve_heads(self.model, task, labels, output, heads, output_kind or "logits")
        example = self._example_batch()
        with shared_inference(self.model):
            return resolve_heads(self.model, task, labels, output, heads, output_kind, example)

    def _example_batch(self) -> Tensor | None:
        shape = self.preprocess_spec.input_shape
        if shape is None:
            return None
        return torch.randn(1, *shape, dtype=self.preprocess_spec.torch_dtype, device=self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        factory: str | Callable[..., nn.Module] | None = None,
        trust_factory: bool = False,
        float_form: bool = False,
        **overrides: Any,
    ) -> Predictor:
        """A predictor for a bundle directory or an exported ``.onnx`` file (run by onnxruntime).

        What serves the path is decided by :func:`trainfer.serve.served_model.open_served`; the class serves it.

        ``runtime`` (see :func:`trainfer.serve.runtime.compile`; ``"recorded"``: the bundle's
        ``runtime.json``; a :class:`~trainfer.serve.engines.CompiledModel` that ``trainfer.compile``
        returned for this bundle: that form) serves the deploy form on another engine. Without ``runtime``, a
        bundle's ``runtime.json`` serves it (on the CPU; naming another ``device``, the PyTorch model serves), else its
        int8 form (``trainfer quantize``) unless ``runtime`` names a PyTorch runtime: a default load serves the
        form ``trainfer serve`` serves.

        The manifest supplies task, labels, preprocessing, heads and output kinds; ``overrides``
        (``device``, ``batch_size``, ``threshold``, ``cache_size``, ...) are passed on, and override
        the manifest's where they name the same setting (e.g. ``output_kind="probabilities"``).
        ``factory`` and ``trust_factory`` are :func:`trainfer.load`'s (which factories a bundle may name).
        ``float_form``: serve the bundle's float PyTorch model, ignoring any recorded runtime or int8 form
        (what :meth:`explain` needs: gradients).

        What is served is checked against what the bundle declares before it is returned
        (:mod:`trainfer.serve.served_checks`, on fixed probe inputs): a model whose outputs contradict
        a recorded output kind (unless ``output_kind`` overrides the record), labels for another number of
        classes than it outputs, or an int8 form that
        disagrees with the bundle's float weights, is refused with :class:`~trainfer.errors.BundleError`.
        """
        check_keywords("Predictor.load", overrides, _LOAD_OVERRIDES)
        served = open_served(
            check_path("path", path), overrides, factory=factory, trust_factory=trust_factory, float_form=float_form
        )
        settings = {"preprocess": served.preprocess, **served.overrides}
        if served.heads and not _HEAD_SETTINGS & served.overrides.keys():
            predictor = cls._recorded(served.model, served.heads, **settings)
        else:  # the caller overrides some head settings: the recorded ones fill in the others
            predictor = cls(served.model, **{**(head_settings(served.heads) if served.heads else {}), **settings})
        if served.heads and not predictor.generates:  # recorded heads; a generator has no single forward
            # the caller's kinds replace the recorded ones (checked as they run)
            predictor._check_heads(repr(str(path)), kinds="output_kind" not in overrides)
        predictor._check_ctc_work(repr(str(path)))
        return predictor

    def _check_heads(self, source: str, kinds: bool) -> None:
        """Refuse a bundle whose model contradicts its heads' labels or (``kinds``) the output kinds its manifest
        declares, on probe inputs (:func:`trainfer.serve.served_checks.check_declared_heads`)."""
        from trainfer.serve.served_checks import check_declared_heads, probe_inputs

        shape = self.preprocess_spec.input_shape
        if shape is not None:
            probes = probe_inputs(shape, self.preprocess_spec.torch_dtype)
            check_declared_heads(self.forward, self.heads, probes, source, kinds)

    def _check_ctc_work(self, source: str) -> None:
        """Refuse a CTC sequence bundle whose beam search, over the frames its model returns for an input of
        its shape, costs more than the served bound per item (:func:`trainfer.serve.sequence.check_ctc_work`):
        its graph chooses the frames, and each prediction would pay for them."""
        from trainfer.errors import BundleError, DecodingError
        from trainfer.serve.sequence import check_ctc_work

        decoder = self.decoder
        example = self._example_batch() if decoder is not None and decoder.kind == "ctc" else None
        if example is None or decoder.beam_width == 1:
            return
        shape = tuple(select_output(self.forward(example), self.heads[0].select).shape)
        try:
            check_ctc_work(shape, decoder.beam_width)
        except DecodingError as error:
            raise BundleError(f"{source}: {error}") from None

    @staticmethod
    def ensemble(predictors: Iterable[Member], weights: Iterable[float] | None = None) -> Ensemble:
        """Average several predictors: :class:`trainfer.serve.ensemble.Ensemble` (which owns the construction)."""
        return Ensemble(predictors, weights)

    @property
    def task(self) -> str:
        """The task of a single-head predictor, ``"multi-head"`` otherwise."""
        return self.heads[0].task if not self.multi_head else "multi-head"

    @property
    def labels(self) -> list[str] | dict[str, list[str] | None] | None:
        """Class labels (a dict by head name for multi-head predictors)."""
        if not self.multi_head:
            return list(self.heads[0].labels) if self.heads[0].labels else None
        return {str(h.name): list(h.labels) if h.labels else None for h in self.heads}

    @property
    def spec(self) -> dict[str, Any]:
        """What the predictor serves: task, labels, input shape and preprocessing (compared by ensembles)."""
        return {
            "task": self.task,
            "labels": self.labels,
            "input_shape": self.preprocess_spec.input_shape,
            "preprocess": self.preprocess_spec.to_dict(),
            "heads": {str(h.name): h.task for h in self.heads} if self.multi_head else None,
        }

    # ------------------------------------------------------------------ stages
    def preprocess(self, inputs: Any) -> Tensor:
        """``inputs`` (any accepted form) as one validated, normalised batch on the CPU."""
        return self.preprocess_spec.prepare(gather(inputs, self.preprocess_spec))

    def forward(self, batch: Tensor) -> Any:
        """The model's raw output for a preprocessed batch, in eval mode under ``inference_mode``.

        Thread-safe (:func:`trainfer.modes.contexts.shared_inference`: a model not in eval is switched
        and restored under its lock). A batch that requires grad (with grad mode on) runs with
        autograd instead, in the modes the caller set: that is how :mod:`trainfer.attribution`
        differentiates :meth:`scores`.
        """
        batch = batch.to(self.device, non_blocking=True)
        if not isinstance(self.model, nn.Module) or (batch.requires_grad and torch.is_grad_enabled()):
            return self.model(batch)
        with shared_inference(self.model):
            return self.model(batch)

    def scores(self, batch: Tensor) -> Tensor | dict[str, Tensor]:
        """Probabilities (classification ``(N, C)``, binary ``(N,)``) or values (regression) of a batch.

        Computed from the model's output with its output kind (softmax is never applied twice);
        a dict by head name for multi-head predictors.
        """
        per_head = self._head_scores(self.forward(batch))
        if self.multi_head:
            return {str(head.name): scores for head, scores in zip(self.heads, per_head, strict=True)}
        return per_head[0]

    def _head_scores(self, output: Any) -> list[Tensor]:
        scores = []
        for head in self.heads:
            values = select_output(output, head.select)
            if head.kind is not None and not self._checked:
                problem = check_output_kind(values, head.kind.kind, head.task)
                if problem:
                    name = f"head {head.name!r}: " if head.name is not None else ""
                    warnings.warn(f"{name}{problem} ({head.kind.decided_by})", OutputKindWarning, stacklevel=4)
            head_scores = to_scores(values, head.kind.kind if head.kind else "logits", head.task)
            if head.task == "regression":
                head_scores = self.preprocess_spec.unscale_target(head_scores)
            scores.append(head_scores)
        self._checked = True
        return scores

    def _cpu_scores(self, batch: Tensor) -> list[Tensor]:
        return [scores.detach().cpu() for scores in self._head_scores(self.forward(batch))]

    # ------------------------------------------------------------------ prediction
    def predict(self, inputs: Any, top_k: int | None = None) -> list[Result | MultiHeadResult]:
        """One typed result per input sample, in order (a progress bar shows for large inputs)."""
        total = sample_count(inputs)
        results = list(self._run(iter_raw(inputs, self.preprocess_spec), top_k, total))
        if not results:
            raise InputError(
                f"empty input: expected at least one sample of shape {self.preprocess_spec.input_shape or '(any)'}"
            )
        return results

    def predict_iter(self, samples: Iterable[Any], top_k: int | None = None) -> Iterator[Result | MultiHeadResult]:
        """Stream results for an iterable of samples or paths, in order, holding one batch at a time."""
        return self._run(iter_raw(samples, self.preprocess_spec), top_k, None)

    def _run(self, chunks: Iterator[Tensor], top_k: int | None, total: int | None) -> Iterator[Any]:
        top_k = check_top_k(top_k, self.heads)
        show = total is not None and total > self.batch_size
        done = 0
        with tqdm(total=total, unit="sample", desc="predict", disable=None if show else True) as bar:
            for raw, load_seconds in timed_batches(chunks, self.batch_size, self.preprocess_spec):
                yield from self._predict_batch(raw, top_k, load_seconds, done)
                done += len(raw)
                bar.update(len(raw))

    def _predict_batch(self, raw: Tensor, top_k: int | None, load_seconds: float, first: int) -> list[Any]:
        """Results of a checked raw batch whose first sample is input sample ``first``."""
        start = time.perf_counter()
        batch = self.preprocess_spec.normalize(raw, first)  # checked by timed_batches
        prepared = time.perf_counter()
        if self.generates:  # the search calls the model step by step: decoding is the forward
            results = self.generate(batch, top_k)
            forwarded = done = time.perf_counter()
        else:
            if self._cache is not None:
                per_head = self._cache.scores(batch, self._cpu_scores, self.timings, len(self.heads))
            else:
                per_head = self._cpu_scores(batch)
            check_finite_scores(per_head, self.heads, first)
            forwarded = time.perf_counter()
            results = self.results_from_scores(per_head, top_k)
            done = time.perf_counter()
        stages = {
            "preprocess": load_seconds + prepared - start,
            "forward": forwarded - prepared,
            "postprocess": done - forwarded,
        }
        batches = self._record(len(raw), stages)
        logger.debug(
            "batch %d: %d samples, input %s, preprocess %.4fs, forward %.4fs, postprocess %.4fs",
            batches,
            len(raw),
            tuple(batch.shape),
            *stages.values(),
        )
        return results

    def _record(self, samples: int, stages: dict[str, float]) -> int:
        """Add a batch to the timings; return its number."""
        with self._lock:
            timings = self.timings
            timings.preprocess += stages["preprocess"]
            timings.forward += stages["forward"]
            timings.postprocess += stages["postprocess"]
            timings.samples += samples
            timings.batches += 1
            timings.history.append({"samples": samples, **stages})
            return timings.batches

    def generate(self, batch: Tensor, top_k: int | None = None) -> list[Any]:
        """Results of an autoregressive sequence model for a preprocessed ``batch``, decoded in eval mode
        under ``inference_mode`` (:func:`trainfer.serve.sequence.autoregressive_results`)."""
        from trainfer.serve.sequence import autoregressive_results

        batch = batch.to(self.device, non_blocking=True)
        with shared_inference(self.model):
            return autoregressive_results(self.model, batch, self.heads[0].labels, self.decoder, top_k)

    # ------------------------------------------------------------------ postprocess
    def results_from_scores(
        self, per_head: list[Tensor], top_k: int | None, threshold: float | None = None
    ) -> list[Any]:
        """Typed results from per-head scores (``scores()`` of a batch; an ensemble's averaged scores);
        ``threshold``: the binary heads' decision threshold for these results (None: :attr:`threshold`)."""
        threshold = self.threshold if threshold is None else threshold
        columns = [
            self._head_results(head, scores, top_k, threshold)
            for head, scores in zip(self.heads, per_head, strict=True)
        ]
        if not self.multi_head:
            return columns[0]
        names = [str(head.name) for head in self.heads]
        return [MultiHeadResult(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]

    def _head_results(self, head: Head, scores: Tensor, top_k: int | None, threshold: float) -> list[Any]:
        if head.task == "sequence":
            from trainfer.serve.sequence import sequence_results

            return sequence_results(scores, head.labels, self.decoder, top_k)
        if head.task == "classification":
            return classification_results(scores, head.labels, top_k or 1, head.name)
        if head.task == "binary":
            return binary_results(scores, head.labels, threshold)
        return regression_results(scores, head.labels)

    # ------------------------------------------------------------------ explanations
    def explain(self, inputs: Any, method: str = "integrated_gradients", target: Any = None, **options: Any) -> Any:
        """Attributions for ``inputs``: :func:`trainfer.analysis.attribution.explain` of this predictor.

        ``options`` are the method's (``n_steps``, ``baselines``, ...), each checked before Captum runs.
        The scores are checked first as :meth:`predict` checks them (:meth:`check_scores`). Integrated
        gradients that fail completeness (a saturated score) raise :class:`~trainfer.errors.ExplanationError`.
        """
        from trainfer.analysis.attribution import explain

        return explain(self, inputs, method=method, target=target, **options)

    def check_scores(self, scores: Tensor | dict[str, Tensor]) -> None:
        """Refuse :meth:`scores` of input samples 0..N-1 as :meth:`predict` does: NaN or inf raises
        :class:`~trainfer.errors.NonFiniteError` naming the samples (and the head)."""
        per_head = [scores[str(head.name)] for head in self.heads] if isinstance(scores, dict) else [scores]
        check_finite_scores([head_scores.detach().cpu() for head_scores in per_head], self.heads)

    def __repr__(self) -> str:
        tasks = ", ".join(f"{h.name}: {h.task}" if h.name is not None else h.task for h in self.heads)
        return f"Predictor({type(self.model).__name__}, {tasks}, device={self.device}, batch_size={self.batch_size})"


# --------------------------------------------------------------------------- helpers
_CPU = torch.device("cpu")
_HEAD_SETTINGS = frozenset({"task", "labels", "output", "heads", "output_kind"})
#: What ``Predictor.load`` passes on to the constructor (everything but the model).
_LOAD_OVERRIDES = frozenset(inspect.signature(Predictor.__init__).parameters) - {"self", "model"}
