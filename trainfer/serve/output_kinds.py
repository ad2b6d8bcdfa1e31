"""What a model's output means: the output kinds and tasks, and scores from each.

Real training code ends ``forward`` in raw logits, in ``softmax``/``log_softmax``, or in
``sigmoid``. Serving must turn each into probabilities exactly once:

=====================  =============================  ==============================
output kind            classification scores          binary scores
=====================  =============================  ==============================
``logits``             ``softmax(z, dim=1)``          ``sigmoid(z)``
``probabilities``      ``p`` (as is)                  ``p`` (as is)
``log_probabilities``  ``exp(l)``                     ``exp(l)``
=====================  =============================  ==============================

Regression outputs are values and are never transformed. A binary model may also return two
columns; its score is then column 1 of the classification scores.

:func:`check_output_kind` says when values contradict a declared kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from trainfer.errors import InputError

__all__ = [
    "OUTPUT_KINDS", "TASKS", "OutputKind", "OutputKindName", "TaskName", "check_kind", "check_output_kind",
    "check_task", "to_scores",
]  # fmt: skip

OutputKindName = Literal["logits", "probabilities", "log_probabilities"]
TaskName = Literal["classification", "binary", "regression", "sequence"]
OUTPUT_KINDS: tuple[OutputKindName, ...] = get_args(OutputKindName)
TASKS: tuple[TaskName, ...] = get_args(TaskName)


@dataclass(frozen=True)
class OutputKind:
    """An output kind and how it was decided (recorded in the bundle manifest)."""

    kind: str
    decided_by: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "decided_by": self.decided_by}


def check_kind(kind: str) -> str:
    if kind not in OUTPUT_KINDS:
        raise InputError(f"output_kind must be one of {list(OUTPUT_KINDS)}; got {kind!r}")
    return kind


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"task must be one of {list(TASKS)}; got {task!r}")
    return task


def to_scores(values: Tensor, kind: str, task: str) -> Tensor:
    """Probabilities (classification ``(N, C)``, binary ``(N,)``) or values (regression), see module doc."""
    if task == "regression":
        return values
    if task == "sequence":  # per-frame log-probabilities (N, T, C), what the decoders read
        if values.dim() != 3:
            raise InputError(f"a sequence model returns (N, frames, classes) outputs; got {tuple(values.shape)}")
        to_log: dict[str, Callable[[Tensor, int], Tensor]] = {
            "logits": torch.log_softmax,
            "probabilities": _log,
            "log_probabilities": _keep,
        }
        return to_log[kind](values, -1)
    if task == "binary":
        if values.dim() == 2 and values.shape[1] == 2:
            return to_scores(values, kind, "classification")[:, 1]
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() != 1:
            raise InputError(f"a binary model returns (N,), (N, 1) or (N, 2) outputs; got {tuple(values.shape)}")
        squash: dict[str, Callable[[Tensor], Tensor]] = {
            "logits": torch.sigmoid,
            "probabilities": _same,
            "log_probabilities": torch.exp,
        }
        return squash[kind](values)
    if values.dim() != 2:
        raise InputError(f"a classification model returns (N, classes) outputs; got {tuple(values.shape)}")
    if kind == "logits":
        return torch.softmax(values, dim=1)
    return values if kind == "probabilities" else torch.exp(values)


def _same(values: Tensor) -> Tensor:
    return values


def _log(values: Tensor, dim: int) -> Tensor:
    return values.log()


def _keep(values: Tensor, dim: int) -> Tensor:
    return values


def check_output_kind(values: Tensor, kind: str, task: str, tolerance: float = 1e-3) -> str | None:
    """A message when ``values`` contradict ``kind``, else ``None``.

    Contradictions: "probabilities" outside [0, 1] or whose rows do not sum to 1; "log_probabilities"
    above 0 or whose ``exp`` rows do not sum to 1; "logits" that already are such rows of
    probabilities (softmax would be applied twice) or of log-probabilities (the declaration is
    wrong, though softmax and log_softmax leave them as they are). Rows run along the class axis:
    the last one of a classification ``(N, C)`` (``C > 1``) or a sequence ``(N, T, C)`` output; a
    binary or regression output has none.
    """
    if task == "regression" or values.numel() == 0:
        return None
    values = values.detach().double()
    axis = _class_axis(values, task)
    low, high = float(values.min()), float(values.max())
    if kind == "probabilities":
        if low < -tolerance or high > 1 + tolerance:
            return f"declared output kind 'probabilities', but outputs range over [{low:.4g}, {high:.4g}], not [0, 1]"
        sums = values.sum(axis) if axis is not None else None
        if sums is not None and float((sums - 1).abs().max()) > tolerance:
            return (
                f"declared output kind 'probabilities', but rows sum to [{float(sums.min()):.4g}, "
                f"{float(sums.max()):.4g}], not 1"
            )
    elif kind == "log_probabilities":
        if high > tolerance:
            return f"declared output kind 'log_probabilities', but outputs reach {high:.4g} > 0"
        sums = values.exp().sum(axis) if axis is not None else None
        if sums is not None and float((sums - 1).abs().max()) > tolerance:
            return f"declared output kind 'log_probabilities', but exp(rows) sum to {float(sums.min()):.4g}.., not 1"
    elif axis is not None and low >= 0 and high <= 1 and _sum_to_one(values.sum(axis)):
        return (
            "declared output kind 'logits', but outputs look like probabilities (rows in [0, 1] summing to 1): "
            "softmax would be applied twice; pass output_kind='probabilities'"
        )
    elif axis is not None and _sum_to_one(values.exp().sum(axis)):
        return (
            "declared output kind 'logits', but outputs look like log-probabilities (rows whose exp sums to 1): "
            "pass output_kind='log_probabilities'"
        )
    return None


def _class_axis(values: Tensor, task: str) -> int | None:
    """The axis along which a row of class scores runs (see :func:`check_output_kind`), or None."""
    if task == "classification" and values.dim() == 2 and values.shape[1] > 1:
        return 1
    if task == "sequence" and values.dim() == 3:
        return 2
    return None


def _sum_to_one(sums: Tensor) -> bool:
    """Whether every row sum is 1 closely enough that the rows were normalised (not raw logits)."""
    return float((sums - 1).abs().max()) <= 1e-4
