"""What a prediction returns: typed results per task, their JSON records, and the stage timings.

:class:`ClassificationResult` (class, label, probability, top-k), :class:`BinaryResult`
(probability, decision at a threshold), :class:`RegressionResult` (values in target units) and
:class:`MultiHeadResult` (one per head); :func:`results_for` builds them from a head's scores, the
one postprocessing step the Predictor and ensembles share. Non-finite scores are refused first
(:func:`check_finite_scores`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainfer.errors import InputError, NonFiniteError
from trainfer.numerics import all_finite
from trainfer.serve.decoder_bounds import MAX_SERVED_BEAM_WIDTH
from trainfer.serve.outputs import Head
from trainfer.validate import check_integer, check_number

#: Per-batch timings kept by :class:`Timings` (bounded, so that a stream does not grow memory).
HISTORY = 1024

__all__ = [
    "HISTORY",
    "BinaryResult",
    "ClassificationResult",
    "MultiHeadResult",
    "RegressionResult",
    "Result",
    "Timings",
    "binary_results",
    "check_finite_scores",
    "check_classes",
    "check_threshold",
    "check_top_k",
    "class_names",
    "classification_results",
    "regression_results",
    "to_records",
]


@dataclass(frozen=True)
class ClassificationResult:
    """The most probable class and the ``top_k`` (label, probability) pairs, best first."""

    index: int
    label: str
    probability: float
    top_k: list[tuple[str, float]]

    def to_record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "probability": self.probability,
            "top_k": [[label, p] for label, p in self.top_k],
        }


@dataclass(frozen=True)
class BinaryResult:
    """The probability of the positive class and the decision ``probability >= threshold``."""

    probability: float
    decision: bool
    threshold: float
    label: str | None = None

    def to_record(self) -> dict[str, Any]:
        record = {"probability": self.probability, "decision": self.decision, "threshold": self.threshold}
        return record if self.label is None else {**record, "label": self.label}


@dataclass(frozen=True)
class RegressionResult:
    """The predicted values in target units (the target scaling of the preprocess spec undone)."""

    values: list[float]
    names: tuple[str, ...] | None = None

    def to_record(self) -> dict[str, Any]:
        if self.names is not None and len(self.names) == len(self.values):
            return {"values": self.values, "named": dict(zip(self.names, self.values, strict=True))}
        return {"values": self.values}


Result = ClassificationResult | BinaryResult | RegressionResult


@dataclass(frozen=True)
class MultiHeadResult:
    """One typed result per head, by head name."""

    heads: dict[str, Result]

    def __getitem__(self, name: str) -> Result:
        return self.heads[name]

    def to_record(self) -> dict[str, Any]:
        return {name: result.to_record() for name, result in self.heads.items()}


@dataclass
class Timings:
    """Seconds spent per stage, samples and batches processed, and prediction-cache hits/misses.

    ``history`` keeps the per-batch figures of the last ``HISTORY`` batches (bounded for streams).
    """

    preprocess: float = 0.0
    forward: float = 0.0
    postprocess: float = 0.0
    samples: int = 0
    batches: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    history: deque[dict[str, float]] = field(default_factory=lambda: deque(maxlen=HISTORY), repr=False)

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if key != "history"}


def to_records(results: Iterable[Any]) -> list[dict[str, Any]]:
    """JSON-able dicts of typed results (``result.to_record()`` each), e.g. for JSON lines."""
    return [result.to_record() for result in results]


def check_finite_scores(per_head: list[Tensor], heads: list[Head], first: int = 0) -> None:
    """Raise :class:`NonFiniteError` naming the input samples whose scores hold NaN or inf.

    ``per_head`` holds one ``(N, ...)`` score tensor per head of ``heads``, for input samples
    ``first .. first + N - 1``; a non-finite score is never served as a prediction.
    """
    for head, scores in zip(heads, per_head, strict=True):
        if scores.is_floating_point() and not all_finite(scores):
            rows = (~torch.isfinite(scores)).reshape(len(scores), -1).any(1).nonzero().flatten()
            bad = (rows + first).tolist()
            name = f" (head {head.name!r})" if head.name is not None else ""
            raise NonFiniteError(
                "the model's output for input sample(s) ",
                bad,
                f"{name} holds NaN or inf: expected finite scores (look for inputs far outside the training range, "
                "or broken weights)",
            )


#: The tasks whose results rank answers, so that a ``top_k`` means something to them.
_RANKING_TASKS = ("classification", "sequence")


def check_top_k(
    top_k: Any, heads: Iterable[Head], name: str = "top_k", classes: Sequence[int | None] = ()
) -> int | None:
    """``top_k`` as an ``int >= 1`` or None, refused (:class:`InputError`) where it would be silently
    cut or ignored: where no head of ``heads`` ranks its answers (a binary or regression model), above
    a classification head's class count (:func:`check_classes`), or above the
    :data:`~trainfer.serve.decoder_bounds.MAX_SERVED_BEAM_WIDTH` hypotheses a sequence head returns
    at most (its n-best: fewer where the search finds fewer).

    A head's class count is its labels' count, else ``classes[i]`` for the i-th head where the caller
    knows it (a server, from its load-time check); unknown, it is checked on the scores
    (:func:`classification_results`). ``name``: how the caller spells the setting in the message
    (``--top-k`` on the command line).
    """
    top_k = check_integer(name, top_k, minimum=1, optional=True)
    heads = list(heads)
    tasks = sorted({head.task for head in heads})
    if top_k is None:
        return None
    if not any(task in _RANKING_TASKS for task in tasks):
        raise InputError(
            f"{name} applies to classification and sequence models only; this model's task is "
            f"{', '.join(tasks)}: drop {name}"
        )
    known = list(classes) + [None] * (len(heads) - len(classes))
    for head, count in zip(heads, known, strict=True):
        if head.task == "sequence" and top_k > MAX_SERVED_BEAM_WIDTH:
            raise InputError(
                f"{name} {top_k} is more than the {MAX_SERVED_BEAM_WIDTH} hypotheses a sequence model returns "
                f"at most{_of_head(head.name)}: give at most {MAX_SERVED_BEAM_WIDTH}"
            )
        if head.task == "classification":
            check_classes(top_k, len(head.labels) if head.labels is not None else count, head.name, name)
    return top_k


def check_threshold(threshold: Any, heads: Iterable[Head], name: str = "threshold") -> float | None:
    """``threshold`` as a finite ``float`` in ``[0, 1]`` or None, refused (:class:`InputError`) where no
    head of ``heads`` is binary: it would be silently ignored. ``name``: how the caller spells the
    setting in the message (``--threshold`` on the command line)."""
    if threshold is None:
        return None
    threshold = check_number(name, threshold, low=0.0, high=1.0)
    tasks = sorted({head.task for head in heads})
    if "binary" not in tasks:
        raise InputError(f"{name} applies to binary models only; this model's task is {', '.join(tasks)}: drop {name}")
    return threshold


def check_classes(top_k: int, classes: int | None, head: str | int | None = None, name: str = "top_k") -> None:
    """Refuse (:class:`InputError`) a ``top_k`` above a classification head's ``classes`` (None: unknown,
    not checked), naming both: ranking more classes than there are would silently return them all."""
    if classes is not None and top_k > classes:
        raise InputError(f"{name} {top_k} is more than the {classes} classes{_of_head(head)}: give at most {classes}")


def _of_head(head: str | int | None) -> str:
    return f" of head {head!r}" if head is not None else ""


def class_names(labels: tuple[str, ...] | None, classes: int) -> tuple[str, ...]:
    """The name of each of ``classes`` classes: ``labels`` (exactly one per class), else ``"0"``, ``"1"``, ..."""
    if labels is None:
        return tuple(str(i) for i in range(classes))
    if len(labels) != classes:
        raise InputError(f"{len(labels)} labels given, but the model outputs {classes} classes")
    return labels


def classification_results(
    scores: Tensor, labels: tuple[str, ...] | None, top_k: int, head: str | int | None = None
) -> list[Result]:
    """One result per row of ``(N, classes)`` probabilities; a ``top_k`` above ``classes`` is refused
    (:func:`check_classes`, ``head``: the head's name in the message)."""
    names = class_names(labels, scores.shape[1])
    check_classes(top_k, scores.shape[1], head)
    values, indices = scores.topk(top_k, dim=1)
    results: list[Result] = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        pairs = [(names[i], p) for i, p in zip(row_indices, row_values, strict=True)]
        results.append(ClassificationResult(row_indices[0], names[row_indices[0]], row_values[0], pairs))
    return results


def binary_results(scores: Tensor, labels: tuple[str, ...] | None, threshold: float) -> list[Result]:
    if labels is not None and len(labels) != 2:
        raise InputError(f"a binary task takes 2 labels (negative, positive); got {len(labels)}")
    results: list[Result] = []
    for p in scores.tolist():
        decision = p >= threshold
        label = labels[int(decision)] if labels is not None else None
        results.append(BinaryResult(p, decision, threshold, label))
    return results


def regression_results(scores: Tensor, labels: tuple[str, ...] | None) -> list[Result]:
    """One :class:`RegressionResult` per row of ``scores`` (a scalar row becomes a one-value list)."""
    return [RegressionResult(row if isinstance(row, list) else [row], labels) for row in scores.tolist()]
