"""The heads a model serves: which output, its task, labels and output kind (declared or detected)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainfer.errors import InputError
from trainfer.serve.output_detection import detect_output_kind
from trainfer.serve.output_kinds import OutputKind, check_kind, check_task
from trainfer.serve.output_structure import Selector

__all__ = ["Head", "resolve_heads"]


@dataclass(frozen=True)
class Head:
    """One served prediction: which output (``select``), its task, labels and output kind.

    A single-task model has one head named ``None``; ``heads={"digit": "classification", ...}``
    gives one head per named (dict key, named-tuple field) or indexed (tuple position) output.
    ``kind`` is ``None`` for regression (values are never transformed).
    """

    name: str | int | None
    select: Selector
    task: str
    labels: tuple[str, ...] | None = None
    kind: OutputKind | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "select": self.select,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "output_kind": self.kind.kind if self.kind else None,
            "output_kind_decided_by": self.kind.decided_by if self.kind else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Head:
        kind = data.get("output_kind")
        return cls(
            name=data.get("name"),
            select=data.get("select"),
            task=check_task(data["task"]),
            labels=tuple(data["labels"]) if data.get("labels") is not None else None,
            kind=OutputKind(check_kind(kind), data.get("output_kind_decided_by") or "recorded") if kind else None,
        )


def resolve_heads(
    model: Any,
    task: str | None = "classification",
    labels: Any = None,
    output: Selector = None,
    heads: Mapping[Any, str] | None = None,
    output_kind: str | Mapping[Any, str] | None = None,
    example_inputs: Any = None,
) -> list[Head]:
    """The heads a model serves, each with its output kind declared or detected (model in eval mode).

    Without ``heads`` there is one head for output ``output`` with ``task`` and ``labels``; with
    ``heads`` (name -> task), ``labels`` and ``output_kind`` may be dicts keyed by head name.
    ``model`` may be any callable; kinds are detected only for ``nn.Module`` models.
    """
    if heads is None:
        plan = [(None, output, check_task(task or "classification"), labels, output_kind)]
    else:
        if not heads:
            raise InputError("heads must name at least one output, e.g. {'digit': 'classification'}")
        plan = [
            (name, name, check_task(t), _per_head(labels, name), _per_head(output_kind, name))
            for name, t in heads.items()
        ]
    return [_head(model, name, select, t, lab, kind, example_inputs) for name, select, t, lab, kind in plan]


def _per_head(value: Any, name: Any) -> Any:
    return value.get(name) if isinstance(value, Mapping) else value


def _head(model: Any, name: Any, select: Selector, task: str, labels: Any, kind: Any, example_inputs: Any) -> Head:
    labels = tuple(str(label) for label in labels) if labels is not None else None
    if task == "regression":
        decided = None
    elif kind is not None:
        decided = OutputKind(check_kind(kind), "declared by the caller")
    elif isinstance(model, nn.Module):
        decided = detect_output_kind(model, select, example_inputs)
    else:
        decided = OutputKind("logits", "default: not a torch module, cannot trace; assumed logits")
    return Head(name, select, task, labels, decided)
