"""Ensembles: several predictors of the same task voting on the same inputs.

For members ``i = 1..M`` with scores ``s_i`` (probabilities for classification and binary tasks,
values in target units for regression, as :meth:`trainfer.Predictor.scores` gives them) and
weights ``w_i >= 0`` normalised to sum to 1, the ensemble serves

    mean    = sum_i w_i s_i
    spread  = sqrt(sum_i w_i (s_i - mean)^2)      (the weighted population standard deviation)

Each member loads and normalises the inputs with its own preprocessing (image size, mean/std,
dtype, device); members must agree on what they predict (task, labels) and on what they read
(input shape, CSV columns), and are refused with the difference named otherwise.

Results are the Predictor's typed results plus ``members`` (how many voted) and ``spread``: the
spread of the chosen class's probability (classification), of the positive probability (binary)
or of each value (regression). A non-finite mean is refused like a Predictor's non-finite scores.

Inputs are read in batches of ``batch_size``: the ensemble's own when given, else the first
member's, read at each call (so changing ``members[0].batch_size`` changes the ensemble's).
An ensemble holds no state of its own besides its members and weights: it is as safe to share
between threads as its members are (see :mod:`trainfer.predict`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from trainfer.errors import InputError, InputTypeError
from trainfer.serve.batching import sample_count, timed_batches
from trainfer.serve.inputs import iter_raw
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.results import (
    BinaryResult,
    ClassificationResult,
    RegressionResult,
    check_finite_scores,
    check_top_k,
)
from trainfer.validate import check_integer, check_type, given

__all__ = [
    "Ensemble",
    "EnsembleBinaryResult",
    "EnsembleClassificationResult",
    "EnsembleRegressionResult",
    "normalised_weights",
]


class _Voted:
    """Adds the ensemble's ``members`` and ``spread`` to a result's record."""

    members: int
    spread: Any

    def to_record(self) -> dict[str, Any]:
        return {**super().to_record(), "members": self.members, "spread": self.spread}  # type: ignore[misc]


@dataclass(frozen=True)
class EnsembleClassificationResult(_Voted, ClassificationResult):
    """A :class:`ClassificationResult`; ``spread`` is the std of the chosen class's probability."""

    members: int = field(kw_only=True)
    spread: float = field(kw_only=True)


@dataclass(frozen=True)
class EnsembleBinaryResult(_Voted, BinaryResult):
    """A :class:`BinaryResult`; ``spread`` is the std of the positive class's probability."""

    members: int = field(kw_only=True)
    spread: float = field(kw_only=True)


@dataclass(frozen=True)
class EnsembleRegressionResult(_Voted, RegressionResult):
    """A :class:`RegressionResult`; ``spread`` holds the std of each value."""

    members: int = field(kw_only=True)
    spread: list[float] = field(kw_only=True)


_VOTED = {
    ClassificationResult: EnsembleClassificationResult,
    BinaryResult: EnsembleBinaryResult,
    RegressionResult: EnsembleRegressionResult,
}

#: Spec entries every member must share: what is predicted, and what is read.
_AGREE_ON = ("task", "labels", "input_shape", "columns")


def _agreement(spec: dict[str, Any]) -> dict[str, Any]:
    """The :data:`_AGREE_ON` entries of a Predictor's ``spec``."""
    columns = (spec.get("preprocess") or {}).get("columns")
    return {"task": spec["task"], "labels": spec["labels"], "input_shape": spec["input_shape"], "columns": columns}


#: What an ensemble uses of each member (a :class:`~trainfer.Predictor`, or anything serving like one).
_MEMBER_API = ("spec", "preprocess_spec", "scores", "heads", "results_from_scores", "batch_size")


class Member(Protocol):
    """What an ensemble uses of each member: a :class:`~trainfer.Predictor` (this module never imports it:
    ``Predictor.ensemble`` delegates here, the ensemble does not depend on the predictor)."""

    @property
    def spec(self) -> dict[str, Any]: ...

    @property
    def preprocess_spec(self) -> PreprocessSpec: ...

    @property
    def heads(self) -> Sequence[Any]: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def threshold(self) -> float: ...

    def scores(self, batch: Tensor) -> Tensor | dict[str, Tensor]: ...

    def results_from_scores(
        self, per_head: list[Tensor], top_k: int | None, threshold: float | None = None
    ) -> list[Any]: ...


def _check_members(members: list[Member]) -> None:
    """Refuse an empty ensemble, multi-head members, and members disagreeing on :data:`_AGREE_ON`."""
    if not members:
        raise InputError("an ensemble needs at least one predictor; got none")
    for index, member in enumerate(members):
        if not all(hasattr(member, name) for name in _MEMBER_API):
            raise InputTypeError(f"ensemble member {index} must be a Predictor; got {given(member)}")
    specs = [_agreement(member.spec) for member in members]
    for index, spec in enumerate(specs):
        if spec["task"] == "sequence":
            raise InputError(
                f"ensemble member {index} is a sequence predictor: sequence models are not averaged (their "
                "per-frame distributions align differently, so their mean is no distribution over sequences); "
                "decode each member and compare the hypotheses instead"
            )
        if spec["task"] not in ("classification", "binary", "regression"):
            raise InputError(
                f"ensemble member {index} is {spec['task']!r}: "
                "expected a classification, binary or regression predictor"
            )
        for key in _AGREE_ON:
            if spec[key] != specs[0][key]:
                raise InputError(
                    f"ensemble members disagree on {key}: "
                    f"member 0 has {specs[0][key]!r}, member {index} has {spec[key]!r}"
                )


def _scores(member: Member, batch: Tensor) -> Tensor:
    """``member.scores(batch)``: a tensor, not a dict, as members are single-head (:func:`_check_members`)."""
    return cast(Tensor, member.scores(batch))


def normalised_weights(given: Iterable[float] | None, count: int) -> Tensor:
    """Validated weights normalised to sum to 1 (equal weights when none are given), float64.

    Only their ratios count: they are first scaled by the power of two that brings the largest below 1
    (exact), so that their sum cannot overflow (``1e308, 1e308`` summed to inf, and every probability to 0)
    and any weights give the same normalised ones as the same ratios in small numbers (``1, 1``).
    """
    if given is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    weights = [float(w) for w in given]
    if len(weights) != count:
        raise InputError(f"expected {count} ensemble weights (one per predictor); got {len(weights)}")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise InputError(f"ensemble weights must be finite and non-negative; got {weights}")
    if max(weights) == 0:
        raise InputError(f"ensemble weights must not all be zero; got {weights}")
    exponent = math.frexp(max(weights))[1]
    scaled = [math.ldexp(w, -exponent) for w in weights]
    return torch.tensor(scaled, dtype=torch.float64) / sum(scaled)


class Ensemble:
    """Weighted average of several :class:`~trainfer.Predictor` s (see the module docstring).

    Quacks like a Predictor for serving: :meth:`predict`, :meth:`predict_iter`, ``spec``, ``task``,
    ``labels``, ``batch_size`` (``batch_size`` if given, else the first member's at call time) and
    ``preprocess_spec`` (the first member's: members read the same input shape and columns, each
    then normalises in its own way).
    """

    def __init__(
        self, predictors: Iterable[Member], weights: Iterable[float] | None = None, batch_size: int | None = None
    ):
        self.members = list(check_type("predictors", predictors, Iterable, "an iterable of Predictors"))
        _check_members(self.members)
        self.weights = normalised_weights(weights, len(self.members))
        self._batch_size = check_integer("batch_size", batch_size, minimum=1, optional=True)

    @property
    def batch_size(self) -> int:
        """Samples per batch: the ensemble's own if given, else the first member's (read now)."""
        return self._batch_size if self._batch_size is not None else self.members[0].batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = check_integer("batch_size", value, minimum=1)

    @property
    def spec(self) -> dict[str, Any]:
        return {**self.members[0].spec, "members": len(self.members)}

    @property
    def task(self) -> str:
        return self.members[0].task

    @property
    def labels(self) -> list[str] | None:
        return cast("list[str] | None", self.members[0].labels)  # not a dict: members are single-head (_check_members)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return self.members[0].preprocess_spec

    #: Members are single-head (:func:`_check_members`), and so is their vote.
    multi_head = False

    @property
    def heads(self) -> Sequence[Any]:
        """The first member's heads (members agree on task and labels): what the mean's results follow."""
        return self.members[0].heads

    @property
    def threshold(self) -> float:
        """The first member's threshold, which binary decisions use."""
        return self.members[0].threshold

    def member_scores(self, inputs: Any) -> Iterator[Tensor]:
        """Per batch of ``batch_size`` samples, every member's scores stacked: ``(M, N, ...)`` float64.

        Every member reads ``inputs`` with its own preprocessing; a one-shot iterator is shared
        with :func:`itertools.tee`, the members advancing together one batch at a time.
        """
        count, size, first = len(self.members), self.batch_size, 0
        sources = itertools.tee(inputs, count) if isinstance(inputs, Iterator) else [inputs] * count
        streams = [
            timed_batches(iter_raw(source, member.preprocess_spec), size, member.preprocess_spec)
            for member, source in zip(self.members, sources, strict=True)
        ]
        for batches in zip(*streams, strict=True):
            yield self.stacked_scores([raw for raw, _ in batches], first)
            first += len(batches[0][0])

    def stacked_scores(self, raw: Sequence[Tensor], first: int = 0) -> Tensor:
        """Every member's scores of one batch, stacked: ``(M, N, ...)`` float64 on the CPU.

        ``raw[i]``: member ``i``'s raw batch (checked by its spec, not normalised; one tensor may stand for
        all), normalised here by that member's preprocessing (``first``: its first sample's number, for errors).
        """
        return torch.stack(
            [
                _scores(member, member.preprocess_spec.normalize(batch, first)).detach().to("cpu", torch.float64)
                for member, batch in zip(self.members, raw, strict=True)
            ]
        )

    def vote(self, stacked: Tensor, first: int = 0) -> tuple[Tensor, Tensor]:
        """The weighted ``mean`` and ``spread`` of :meth:`member_scores`' ``stacked`` (see the module docstring).

        A non-finite mean raises :class:`~trainfer.errors.NonFiniteError` (``first``: the batch's first sample's
        number, for the message).
        """
        w = self.weights.view(-1, *[1] * (stacked.dim() - 1))
        mean = (w * stacked).sum(0)
        check_finite_scores([mean], self.members[0].heads, first)
        return mean, (w * (stacked - mean) ** 2).sum(0).sqrt()

    def voted_results(
        self, mean: Tensor, spread: Tensor, top_k: int | None, threshold: float | None = None
    ) -> list[Any]:
        """The typed results of one batch's :meth:`vote`, with ``members`` and ``spread``; ``threshold``: a
        binary ensemble's decision threshold (None: :attr:`threshold`)."""
        results = self.members[0].results_from_scores([mean], top_k, threshold)
        return [self._voted(result, row) for result, row in zip(results, spread, strict=True)]

    def predict(self, inputs: Any, top_k: int | None = None) -> list[Any]:
        """One result per input sample, in order, with ``members`` and ``spread``."""
        total = sample_count(inputs)
        quiet = not total or total <= self.batch_size
        with tqdm(total=total, unit="sample", desc="ensemble", disable=True if quiet else None) as bar:
            results = []
            for batch in self._results(inputs, top_k):
                results.extend(batch)
                bar.update(len(batch))
        if not results:
            raise InputError("empty input: expected at least one sample")
        return results

    def predict_iter(self, samples: Iterable[Any], top_k: int | None = None) -> Iterator[Any]:
        """Stream results for an iterable of samples or paths, in order, one batch at a time."""
        for batch in self._results(iter(samples), top_k):
            yield from batch

    def _results(self, inputs: Any, top_k: int | None) -> Iterator[list[Any]]:
        top_k = check_top_k(top_k, self.members[0].heads)
        first = 0
        for stacked in self.member_scores(inputs):
            mean, spread = self.vote(stacked, first)
            first += len(mean)
            yield self.voted_results(mean, spread, top_k)

    def _voted(self, result: Any, spread: Tensor) -> Any:
        if isinstance(result, ClassificationResult):
            value: Any = float(spread[result.index])
        elif isinstance(result, BinaryResult):
            value = float(spread)
        else:
            value = spread.reshape(-1).tolist()
        values = {f.name: getattr(result, f.name) for f in fields(result)}
        return _VOTED[type(result)](**values, members=len(self.members), spread=value)

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.3g}" for w in self.weights.tolist())
        return f"Ensemble({len(self.members)} members, {self.spec['task']}, weights=[{weights}])"
