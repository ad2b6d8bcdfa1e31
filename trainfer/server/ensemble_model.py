"""An ensemble served as one model (``trainfer serve A B --ensemble NAME``): the answers of
:meth:`trainfer.Predictor.ensemble` through the server's batches.

A :class:`ServedEnsemble` is a :class:`~trainfer.server.model.ServedModel` whose predictor is an
:class:`~trainfer.serve.ensemble.Ensemble`: a batch of requests runs every member once (each
normalises the batch with its own preprocessing) and the ensemble's own :meth:`~trainfer.serve.ensemble.Ensemble.vote`
gives its mean and spread. So its answers are ``Predictor.ensemble(members, weights).predict``'s,
within the rounding that the batch composition changes in each member's forward.

Outputs are a single model's of the ensemble's task (its mean: ``probabilities``, ``index`` and ``label``;
``probability`` and ``decision``, with the first member's threshold; or ``values``), plus ``spread``: the
weighted standard deviation of the members' scores, per sample that of the chosen class's probability
(classification), of the probability (binary) or of each value (regression), as the typed results'
``spread``. Members are validated as ``Predictor.ensemble`` validates them (task, labels, input shape,
CSV columns; sequence models refused) and must read image files alike (:data:`FILE_READING`: the server
reads each upload once); each loads as ``trainfer serve`` loads a bundle (its recorded runtime, or
``runtime``). Explanations explain one model: ``/explain`` of an ensemble is refused (400).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError
from trainfer.numerics import tolerance_for
from trainfer.serve.ensemble import Ensemble
from trainfer.serve.inputs import gather
from trainfer.serve.predictor import Predictor
from trainfer.serve.served_model import served_form, serving_words
from trainfer.server.model import ServedModel, load_predictor

__all__ = ["FILE_READING", "ServedEnsemble", "check_files_read_alike", "load_ensemble"]


@dataclass
class ServedEnsemble(ServedModel):
    """A named :class:`~trainfer.serve.ensemble.Ensemble` served as one model (see the module docstring)."""

    predictor: Ensemble  # type: ignore[assignment]  # quacks like a Predictor where ServedModel reads it
    #: Why each member's form serves (e.g. "recorded in runtime.json"), said in :meth:`serving`.
    origins: list[str] = field(default_factory=list)

    @property
    def generates(self) -> bool:
        return False  # sequence members are refused

    def key(self, top_k: int | None) -> Hashable:
        return None  # every request shares batches: top_k only ranks the mean

    def prepare(self, raw: Any) -> Tensor:
        """One request's samples checked as the members check them, cast to :attr:`input_dtype`."""
        spec = self.predictor.preprocess_spec
        batch = raw if isinstance(raw, np.ndarray) else gather(raw, spec)
        return spec.check_batch(batch).to(self.input_dtype)

    @property
    def input_dtype(self) -> torch.dtype:
        """The widest of the members' input dtypes: each member's own cast, when it normalises, then sees the
        request's numbers, as with ``Predictor.ensemble``."""
        dtypes = [member.preprocess_spec.torch_dtype for member in self.predictor.members]
        widest = dtypes[0]
        for dtype in dtypes[1:]:
            widest = torch.promote_types(widest, dtype)
        return widest

    def _agree(self, alone: Tensor, together: Tensor, tolerance: float | None = None) -> None:
        """:meth:`ServedModel._agree` within the widest tolerance of the members' dtypes (the mean is float64, but
        each member's forward rounds as its own dtype does with the batch composition)."""
        if tolerance is None:
            tolerance = max(tolerance_for(member.preprocess_spec.torch_dtype) for member in self.predictor.members)
        super()._agree(alone, together, tolerance)

    def compute(self, batch: Tensor, top_k: int | None = None) -> list[Any]:
        """Every member's scores of ``batch``, voted: ``[mean, top_class, spread]`` (no ``top_class`` unless the
        task is classification), numpy arrays ``(N, ...)`` whose rows are the requests' answers. A non-finite
        mean raises :class:`~trainfer.errors.NonFiniteError` as a single model's scores do."""
        stacked = self.predictor.stacked_scores([batch] * len(self.predictor.members))
        mean, spread = self.predictor.vote(stacked)
        ranked = [mean.topk(1, dim=1).indices.numpy()[:, 0]] if self.predictor.task == "classification" else []
        return [mean.numpy(), *ranked, spread.numpy()]

    def results(self, rows: list[Any], top_k: int | None, threshold: float | None = None) -> list[Any]:
        """The ensemble's typed results (``members`` and ``spread`` included) of one request's rows;
        ``threshold``: a binary ensemble's decision threshold for this request (None: the first member's)."""
        return self.predictor.voted_results(torch.from_numpy(rows[0]), torch.from_numpy(rows[-1]), top_k, threshold)

    def tensors(self, rows: list[Any]) -> dict[str, np.ndarray]:
        """A single model's outputs of the mean, plus ``spread`` (the typed results' ``spread`` per sample)."""
        tensors = super().tensors(rows)
        spread = rows[-1]
        if "index" in tensors:
            spread = spread[np.arange(len(spread)), tensors["index"]]
        return {**tensors, "spread": spread}

    def explain(self, sample: Any, target: int | None = None) -> Any:
        raise InputError(
            f"model {self.name!r} is an ensemble of {len(self.predictor.members)} bundles: an explanation explains "
            "one model; serve a member on its own to explain it"
        )

    def metadata(self) -> dict[str, Any]:
        """A single model's metadata, its parameters naming the members' count and normalised weights."""
        metadata = super().metadata()
        weights = self.predictor.weights.tolist()
        metadata["parameters"].update(members=len(weights), weights=weights)
        return metadata

    def _runtime(self) -> dict[str, Any]:
        """``{"runtimes": [...]}`` (each member's ``"<runtime>/<dtype>"`` or ``None``) when a compiled form
        serves some member, else ``{}``."""
        forms = [served_form(member.model) for member in self.predictor.members]
        return {"runtimes": forms} if any(forms) else {}

    def _decoder(self) -> dict[str, Any]:
        return {}

    def serving(self) -> str:
        """What serves each member, for the ready log line."""
        members = zip(self.predictor.members, self.origins, strict=True)
        words = "; ".join(serving_words(member.model, origin) for member, origin in members)
        return f"an ensemble of {len(self.origins)} members: {words}"


def load_ensemble(
    name: str,
    paths: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None,
    *,
    runtime: str | None,
    trust_factory: bool,
    max_batch: int,
) -> ServedEnsemble:
    """Load each bundle of ``paths`` as ``trainfer serve`` loads one, build ``Predictor.ensemble(members, weights)``
    (its refusals unchanged) and check it as a served model (:meth:`~trainfer.server.model.ServedModel.check`)."""
    loaded = [load_predictor(name, path, runtime, trust_factory, max_batch) for path in paths]
    ensemble = Predictor.ensemble([predictor for predictor, _ in loaded], weights)
    check_files_read_alike(name, ensemble)
    model = ServedEnsemble(name, ensemble, origins=[origin for _, origin in loaded])
    model.check()
    return model


#: The preprocessing settings that decide how an image file is read into numbers (before ``mean``/``std``).
FILE_READING = ("pixel_scale", "channel_order", "resize", "resample")


def check_files_read_alike(name: str, ensemble: Ensemble) -> None:
    """Refuse members that read image files differently (:data:`FILE_READING`): the server reads each upload
    once, with the first member's settings, where ``Predictor.ensemble`` reads a file once per member."""
    first = ensemble.members[0].preprocess_spec
    for index, member in enumerate(ensemble.members[1:], start=1):
        for setting in FILE_READING:
            mine, theirs = getattr(first, setting), getattr(member.preprocess_spec, setting)
            if mine != theirs:
                raise InputError(
                    f"ensemble {name!r}: members read image files differently: member 0 has {setting} {mine!r}, "
                    f"member {index} has {theirs!r} (the server reads each upload once): expected the same {setting}"
                )
