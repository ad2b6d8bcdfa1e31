"""The ``sequence`` task: per-frame scores decoded into token sequences, with typed results.

A sequence model served by the :class:`~trainfer.serve.predictor.Predictor` returns per-frame class
scores ``(N, T, C)`` (a CTC recogniser: OCR, speech, digit strings); its scores are the per-frame
log-probabilities (log-softmax of logits, the log of probabilities, or log-probabilities as they
are), decoded by :mod:`trainfer.decoding` with the settings recorded in the bundle manifest's
``decoder`` entry (:class:`DecoderSettings`):

* ``kind``: ``"ctc"`` (one forward per batch, then :func:`trainfer.decoding.ctc_beam_search`) or
  ``"autoregressive"`` (a model with ``encode`` and ``step``, see
  :class:`trainfer.decoding.StepModel`; decoded by :func:`autoregressive_results`, which drives
  :func:`trainfer.decoding.beam_search` over the model, so there is no single forward per batch);
* ``blank`` (CTC), ``bos``/``eos``/``pad`` (autoregressive): ids into the token table, which is the
  head's ``labels`` (the blank's entry is the empty string);
* ``beam_width`` (Hugging Face's ``num_beams``; 1: greedy), ``n_best`` (hypotheses returned,
  ``num_return_sequences``), ``max_length``, ``length_penalty`` and ``early_stopping``
  (autoregressive: True, False or ``"never"``): bounded as in :mod:`trainfer.serve.decoder_bounds`
  (tighter than the library's searches: a bundle's settings are read from a file).

Ensembles refuse sequence predictors: averaging per-frame distributions of different models is not
the average of their distributions over sequences (the alignments differ), so it has no meaning to
serve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from trainfer import decoding
from trainfer.decoding.checks import check_finite_float, check_int
from trainfer.decoding.interface import batch_size
from trainfer.decoding.tokens import TokenTable
from trainfer.errors import DecodingError
from trainfer.serve.decoder_bounds import (
    MAX_SERVED_BEAM_WIDTH,
    MAX_SERVED_LENGTH,
    ctc_work_problem,
    search_work_problem,
)

KINDS = ("ctc", "autoregressive")

__all__ = [
    "KINDS",
    "CheckedStep",
    "DecoderSettings",
    "SequenceResult",
    "autoregressive_results",
    "check_ctc_work",
    "is_autoregressive",
    "sequence_results",
]


@dataclass(frozen=True)
class DecoderSettings:
    """How a sequence head is decoded (the manifest's ``decoder``; see the module docstring)."""

    kind: str = "ctc"
    blank: int | None = 0
    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    beam_width: int = 1
    n_best: int = 1
    max_length: int = 64
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DecodingError(f"decoder kind must be one of {list(KINDS)}; got {self.kind!r}")
        check_int("beam_width", self.beam_width, 1, MAX_SERVED_BEAM_WIDTH)
        check_int("n_best", self.n_best, 1, self.beam_width)
        check_int("max_length", self.max_length, 1, MAX_SERVED_LENGTH)
        problem = search_work_problem(self.beam_width, self.max_length) if self.kind == "autoregressive" else None
        if problem:
            raise DecodingError(problem)
        check_finite_float("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise DecodingError(f"early_stopping must be true, false or 'never'; got {self.early_stopping!r}")
        if self.kind == "ctc" and self.blank is None:
            raise DecodingError("a CTC decoder needs a blank id")
        if self.kind == "autoregressive" and (self.bos is None or self.eos is None):
            raise DecodingError("an autoregressive decoder needs bos and eos ids")

    @classmethod
    def coerce(cls, value: DecoderSettings | Mapping[str, Any] | None) -> DecoderSettings:
        """Settings from themselves, a dict (the manifest's entry; unknown keys refused) or None (CTC defaults)."""
        if value is None or isinstance(value, DecoderSettings):
            return value or cls()
        if not isinstance(value, Mapping):
            raise DecodingError(f"decoder settings must be a dict; got {type(value).__name__}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise DecodingError(
                f"unknown decoder settings {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    def table(self, labels: tuple[str, ...] | None, classes: int | None = None) -> TokenTable:
        """The token table: ``labels`` (or the class ids as strings, the blank as "") with these ids, checked."""
        if labels is None:
            if classes is None:
                raise DecodingError("a sequence head needs labels (the token table) or a known class count")
            labels = tuple("" if i == self.blank else str(i) for i in range(classes))
        if classes is not None and len(labels) != classes:
            raise DecodingError(f"the token table has {len(labels)} entries, but the model scores {classes} classes")
        blank = self.blank if self.kind == "ctc" else None
        return TokenTable(labels, blank=blank, bos=self.bos, eos=self.eos, pad=self.pad)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SequenceResult:
    """One decoded sequence: its text and token ids, its score, confidences and the n-best list.

    ``score`` is what the search ranked by. CTC: the log-probability of the sequence (beam: summed
    over its alignments; greedy: the best path's). Autoregressive: ``log_prob / length **
    length_penalty`` (:class:`trainfer.decoding.Hypothesis`). ``token_confidence`` is per token the
    probability the model gave it (CTC greedy: of the frame that emitted it; autoregressive: at the
    step that chose it); ``frame_confidence`` (CTC) is per frame the top class probability.
    ``n_best`` holds ``(text, score)`` pairs, best first, when more than one was asked for.
    ``finished`` (autoregressive): False when the sequence was cut at ``max_length``, not ended by EOS.
    """

    text: str
    tokens: list[int]
    score: float
    frame_confidence: list[float] | None
    token_confidence: list[float] | None = None
    n_best: list[tuple[str, float]] | None = None
    finished: bool | None = None

    def to_record(self) -> dict[str, Any]:
        """Everything, for JSON lines: the per-token and per-frame confidences in full."""
        record: dict[str, Any] = {"text": self.text, "tokens": self.tokens, "score": self.score}
        if self.finished is not None:
            record["finished"] = self.finished
        if self.token_confidence is not None:
            record["token_confidence"] = self.token_confidence
        if self.frame_confidence is not None:
            record["frame_confidence"] = self.frame_confidence
        if self.n_best is not None:
            record["n_best"] = [[text, score] for text, score in self.n_best]
        return record

    def summary_record(self) -> dict[str, Any]:
        """One readable table row: text, score, the lowest confidence (token's, else frame's), the n-best."""
        record: dict[str, Any] = {"text": self.text, "score": self.score}
        if self.finished is not None:
            record["finished"] = self.finished
        confidences = self.token_confidence if self.token_confidence else self.frame_confidence
        record["min_confidence"] = min(confidences) if confidences else None
        if self.n_best is not None:
            record["n_best"] = [[text, score] for text, score in self.n_best]
        return record


def sequence_results(
    log_probs: Tensor, labels: tuple[str, ...] | None, settings: DecoderSettings, n_best: int | None = None
) -> list[SequenceResult]:
    """Decode ``(N, T, C)`` per-frame log-probabilities into one :class:`SequenceResult` per row.

    ``n_best`` (the Predictor's ``top_k``) overrides the settings' ``n_best``; the beam widens to it. A beam
    search costing more than :data:`~trainfer.serve.decoder_bounds.MAX_SERVED_CTC_WORK` per item (too many
    frames for the beam) is refused before it runs (:func:`check_ctc_work`).
    """
    if settings.kind != "ctc":
        raise DecodingError(
            "autoregressive settings decode a model, not scores: use autoregressive_results(model, inputs, ...) "
            "or trainfer.decoding.beam_search(model, inputs, ...)"
        )
    if log_probs.dim() != 3:
        raise DecodingError(f"a CTC sequence model returns (N, frames, classes) scores; got {tuple(log_probs.shape)}")
    table = settings.table(labels, log_probs.shape[2])
    blank = int(settings.blank)  # type: ignore[arg-type]  # checked by DecoderSettings
    wanted = settings.n_best if n_best is None else check_int("n_best", n_best, 1, MAX_SERVED_BEAM_WIDTH)
    frames = log_probs.max(dim=2).values.exp().tolist()
    if settings.beam_width == 1 and wanted == 1:
        found = decoding.ctc_greedy_confidences(log_probs, blank=blank)
        return [
            SequenceResult(
                table.text(h.tokens), list(h.tokens), h.score, f, [math.exp(c) for c in h.token_log_probs or ()]
            )
            for h, f in zip(found, frames)
        ]
    width = max(settings.beam_width, wanted)
    check_ctc_work(log_probs.shape, width)
    beams = decoding.ctc_beam_search(log_probs, beam_width=width, blank=blank, n_best=wanted)
    out = []
    for hyps, f in zip(beams, frames):
        best = hyps[0]
        listed = [(table.text(h.tokens), h.score) for h in hyps] if wanted > 1 else None
        out.append(SequenceResult(table.text(best.tokens), list(best.tokens), best.score, f, None, listed))
    return out


def check_ctc_work(shape: tuple[int, ...], beam_width: int) -> None:
    """Refuse (:class:`DecodingError`) a CTC beam search of ``beam_width`` over scores of ``shape``
    ``(N, frames, classes)`` that costs more than the served bound per item (see
    :func:`~trainfer.serve.decoder_bounds.ctc_work_problem`); a beam of 1 (best path) costs ``frames × classes``.
    Scores of another rank are left to the caller's own check."""
    problem = ctc_work_problem(shape[1], beam_width, shape[2]) if beam_width > 1 and len(shape) == 3 else None
    if problem:
        raise DecodingError(f"{problem}: refusing to decode (lower the beam_width, or the frames)")


def is_autoregressive(decoder: DecoderSettings | Mapping[str, Any] | None) -> bool:
    """Whether ``decoder`` (settings, the manifest's dict or None) names the autoregressive kind."""
    if isinstance(decoder, DecoderSettings):
        return decoder.kind == "autoregressive"
    return isinstance(decoder, Mapping) and decoder.get("kind") == "autoregressive"


def autoregressive_results(
    model: Any, inputs: Any, labels: tuple[str, ...] | None, settings: DecoderSettings, n_best: int | None = None
) -> list[SequenceResult]:
    """Decode ``inputs`` with an autoregressive ``model`` (``encode``/``step``) into one result per item.

    Beam width 1 and one result: :func:`trainfer.decoding.greedy_search`; otherwise
    :func:`trainfer.decoding.beam_search` with the settings (``n_best``, the Predictor's ``top_k``,
    overrides the settings' ``n_best``; the beam widens to it). Every step's log-probs must score
    exactly the token table's entries (:class:`CheckedStep`).
    """
    if settings.kind != "autoregressive":
        raise DecodingError(f"autoregressive_results needs autoregressive decoder settings; got kind {settings.kind!r}")
    if labels is None:
        raise DecodingError("an autoregressive sequence model needs labels: the token table its step() scores")
    table = settings.table(labels)
    wanted = settings.n_best if n_best is None else check_int("n_best", n_best, 1, MAX_SERVED_BEAM_WIDTH)
    width = max(settings.beam_width, wanted)
    problem = search_work_problem(width, settings.max_length)
    if problem:
        raise DecodingError(f"top_k {wanted} widens the beam: {problem}")
    common: dict[str, Any] = {
        "bos": settings.bos,
        "eos": settings.eos,
        "pad": settings.pad,
        "max_length": settings.max_length,
        "length_penalty": settings.length_penalty,
    }
    checked = CheckedStep(model, len(table.tokens))
    if width == 1:
        found = [[h] for h in decoding.greedy_search(checked, inputs, **common)]
    else:
        found = decoding.beam_search(
            checked,
            inputs,
            num_beams=width,
            early_stopping=settings.early_stopping,
            num_return_sequences=wanted,
            **common,
        )
    return [_generated(hyps, table, wanted > 1) for hyps in found]


def _generated(hyps: list[decoding.Hypothesis], table: TokenTable, listed: bool) -> SequenceResult:
    best = hyps[0]
    confidence = [math.exp(c) for c in best.token_log_probs or ()]
    n_best = [(table.text(h.tokens), h.score) for h in hyps] if listed else None
    return SequenceResult(
        table.text(best.tokens), list(best.tokens), best.score, None, confidence, n_best, best.finished
    )


class CheckedStep:
    """A :class:`~trainfer.decoding.StepModel` whose steps must score exactly ``vocab`` tokens (the table's).

    Delegates ``encode``, ``step`` and the model's own ``reorder_state`` when it has one; a step
    returning another number of classes is refused with a :class:`~trainfer.errors.DecodingError`
    (the searches check the rest of the shape, the rows, and the values).
    """

    def __init__(self, model: Any, vocab: int):
        if not callable(getattr(model, "encode", None)) or not callable(getattr(model, "step", None)):
            raise DecodingError(
                f"an autoregressive sequence model needs encode(inputs) and step(state, tokens) methods; "
                f"{type(model).__name__} lacks them (see trainfer.decoding.StepModel)"
            )
        self.model, self.vocab = model, vocab

    def encode(self, inputs: Any) -> Any:
        return self.model.encode(inputs)

    def step(self, state: Any, tokens: Tensor) -> tuple[Any, Any]:
        out = self.model.step(state, tokens)
        if not isinstance(out, tuple) or len(out) != 2:
            raise DecodingError(f"step() must return (log_probs, state); got {type(out).__name__}")
        log_probs = out[0]
        if isinstance(log_probs, Tensor) and log_probs.dim() == 2 and log_probs.shape[1] != self.vocab:
            raise DecodingError(
                f"step() returned scores over {log_probs.shape[1]} tokens, but the token table has {self.vocab}"
            )
        return out

    def reorder_state(self, state: Any, index: Tensor) -> Any:
        own = getattr(self.model, "reorder_state", None)
        if callable(own):
            return own(state, index)
        return decoding.reorder_state(state, index, batch_size(state))
