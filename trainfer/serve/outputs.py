"""What a model's output means: logits, probabilities or log-probabilities — and which output.

Real training code ends ``forward`` in raw logits, in ``softmax``/``log_softmax``, or in
``sigmoid``; serving turns each into probabilities exactly once (the table of
:mod:`~trainfer.serve.output_kinds`). Regression outputs are values and are never transformed.

:func:`detect_output_kind` reads the kind from the final operation of the model's traced eval
graph (torch.fx, with the folder's tracer :func:`trainfer.reparam.fold.trace.trace`), looking
through shape-only operations (``flatten``, ``view``, ``squeeze``, ...).
When tracing fails it runs the model once on example inputs and looks at the aten operator that
produced the output (again through reshapes).

The concepts live in their own modules; this one re-exports their public names:
:mod:`~trainfer.serve.output_kinds` (kinds, tasks, :func:`to_scores`, :func:`check_output_kind`),
:mod:`~trainfer.serve.output_structure` (:func:`select_output` and the structure of tuple and dict
outputs), :mod:`~trainfer.serve.output_detection` (:func:`detect_output_kind`) and
:mod:`~trainfer.serve.heads` (:class:`Head`, :func:`resolve_heads`).
"""

from __future__ import annotations

from trainfer.serve.heads import Head, resolve_heads
from trainfer.serve.output_detection import detect_output_kind
from trainfer.serve.output_kinds import (
    OUTPUT_KINDS,
    TASKS,
    OutputKind,
    OutputKindName,
    TaskName,
    check_kind,
    check_output_kind,
    check_task,
    to_scores,
)
from trainfer.serve.output_structure import Selector, describe_structure, flatten_outputs, select_output

__all__ = [
    "OUTPUT_KINDS",
    "TASKS",
    "Head",
    "OutputKind",
    "OutputKindName",
    "Selector",
    "TaskName",
    "check_kind",
    "check_task",
    "check_output_kind",
    "describe_structure",
    "detect_output_kind",
    "flatten_outputs",
    "resolve_heads",
    "select_output",
    "to_scores",
]
