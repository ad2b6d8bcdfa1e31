"""The accuracy gate: may a reduced-precision form (bf16, fp16, int8) replace the float form?

Exactness cannot be asked of reduced precision, so the check becomes three figures a user can
read, measured on data the user gives (or random inputs where none is given):

* ``max_rel_error`` — ``max |candidate - reference| / max |reference|`` over all outputs (infinite
  when the candidate's outputs hold NaN or inf: such a candidate fails the gate, whatever its limits);
* ``agreement`` — the share of samples whose predicted class (argmax) is the reference's;
* ``accuracy_drop`` — reference accuracy minus candidate accuracy, on labelled data only.

:class:`AccuracyGate` holds the limits (defaults: agreement >= 99 %, accuracy drop <= 0.5
points, no limit on the relative error) and :func:`gate_report` measures a candidate against them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from trainfer.errors import InputError
from trainfer.serve.calibration import class_indices

__all__ = [
    "MIN_GATE_SAMPLES",
    "AccuracyGate",
    "GateReport",
    "gate_report",
    "logits_over",
    "warn_gated_on_calibration",
    "warn_small_gate",
]

#: The fewest gate samples whose verdict :func:`warn_small_gate` lets pass without a warning. On ``n``
#: samples one disagreement moves agreement by ``1/n``: under 30, the default ``min_agreement`` of 0.99
#: means "no disagreement at all", and a 95 % interval for an observed agreement of 1.0 still reaches
#: down to about ``1 - 3/n`` (the rule of three: 0.9 at 30 samples, nothing useful at 1).
MIN_GATE_SAMPLES = 30


@dataclass(frozen=True)
class AccuracyGate:
    """Limits a reduced-precision form must meet; ``None`` switches a check off.

    ``max_accuracy_drop`` is a fraction (0.005 = 0.5 percentage points); it applies only when
    labels are given.
    """

    min_agreement: float | None = 0.99
    max_accuracy_drop: float | None = 0.005
    max_rel_error: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_accuracy_drop", "max_rel_error"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value >= 0):
                raise InputError(f"{name} must be a non-negative number or None; got {value!r}")
        if self.min_agreement is not None and self.min_agreement > 1:
            raise InputError(f"min_agreement is a fraction in [0, 1]; got {self.min_agreement}")


@dataclass(frozen=True)
class GateReport:
    """The figures of one candidate against the float reference, and the verdict of the gate."""

    gate: AccuracyGate
    samples: int
    max_rel_error: float
    agreement: float
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        """Reference minus candidate accuracy (a fraction), ``None`` without labels."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.reference_accuracy - self.candidate_accuracy

    def failures(self) -> list[str]:
        """One sentence per limit that is not met (empty: the gate passes)."""
        gate, problems = self.gate, []
        if self.samples < 1:
            problems.append("measured on no samples")
        if gate.min_agreement is not None and self.agreement < gate.min_agreement:
            problems.append(f"class agreement {self.agreement:.2%} < required {gate.min_agreement:.2%}")
        drop = self.accuracy_drop
        if gate.max_accuracy_drop is not None and drop is not None and drop > gate.max_accuracy_drop:
            problems.append(
                f"accuracy drop {100 * drop:.2f} points > allowed {100 * gate.max_accuracy_drop:.2f} "
                f"({self.reference_accuracy:.2%} -> {self.candidate_accuracy:.2%})"
            )
        if not math.isfinite(self.max_rel_error):  # gate_report's mark of outputs holding NaN or inf
            problems.append(f"max relative output error {self.max_rel_error}: the outputs hold NaN or inf")
        elif gate.max_rel_error is not None and not self.max_rel_error <= gate.max_rel_error:
            problems.append(f"max relative output error {self.max_rel_error:.3e} > allowed {gate.max_rel_error:.0e}")
        return problems

    @property
    def ok(self) -> bool:
        """Every limit is met."""
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, "ok": self.ok}

    def __str__(self) -> str:
        text = (
            f"gate {'passed' if self.ok else 'FAILED'} on {self.samples} samples: "
            f"class agreement {self.agreement:.2%}, max rel error {self.max_rel_error:.2e}"
        )
        if self.accuracy_drop is not None:
            text += (
                f", accuracy {self.reference_accuracy:.2%} (float) -> {self.candidate_accuracy:.2%} "
                f"(drop {100 * self.accuracy_drop:.2f} points)"
            )
        failures = self.failures()
        return text + ("" if not failures else "; " + "; ".join(failures))


def logits_over(model: Callable[[Tensor], Any], inputs: Tensor, batch_size: int = 256) -> Tensor:
    """``model``'s (first) output over ``inputs`` in batches, as one float64 tensor on the CPU."""
    from trainfer.serve.outputs import flatten_outputs

    chunks = []
    with torch.inference_mode():
        for batch in inputs.split(batch_size):
            chunks.append(flatten_outputs(model(batch))[1][0].detach().to("cpu", torch.float64))
    return torch.cat(chunks)


def gate_report(
    reference: Tensor, candidate: Tensor, labels: Tensor | None = None, gate: AccuracyGate | None = None
) -> GateReport:
    """Measure ``candidate`` outputs ``(N, C)`` against ``reference`` outputs (and ``labels``, ``(N,)``)."""
    gate = gate or AccuracyGate()
    if reference.shape != candidate.shape:
        raise InputError(f"candidate outputs have shape {tuple(candidate.shape)}; expected {tuple(reference.shape)}")
    if labels is not None:  # a label no class can match would pass any accuracy drop (both forms miss it)
        labels = class_indices(labels, reference.shape[-1], len(reference))
    reference, candidate = reference.double(), candidate.double()
    scale = float(reference.abs().max()) or 1.0
    error = float((candidate - reference).abs().max()) / scale
    if not torch.isfinite(candidate).all():
        error = float("inf")
    predicted, expected = candidate.argmax(-1), reference.argmax(-1)
    agreement = float((predicted == expected).double().mean())
    accuracies: tuple[float | None, float | None] = (None, None)
    if labels is not None:
        labels = labels.to(predicted.device)
        accuracies = (float((expected == labels).double().mean()), float((predicted == labels).double().mean()))
    return GateReport(gate, len(reference), error, agreement, *accuracies)


def warn_gated_on_calibration(why: str, remedy: str, stacklevel: int = 2) -> None:
    """Warn (``UserWarning``) that an int8 gate measures on the inputs its int8 ranges were calibrated on.

    The one wording of this warning: ``why`` says how it came about (``"quantize: no validation data"``),
    ``remedy`` what to pass instead. ``stacklevel`` is :func:`warnings.warn`'s, counted from the caller.
    """
    warnings.warn(
        f"{why}, so the accuracy gate measures on the calibration inputs themselves, which the int8 ranges "
        f"were fitted to: its verdict overstates agreement on new data. {remedy}",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


def warn_small_gate(samples: int) -> None:
    """Warn (``UserWarning``) when an accuracy gate measures on fewer than :data:`MIN_GATE_SAMPLES` samples.

    A gate passed on one sample says nothing about the next: its verdict stands, but the user is told.
    Issued from here (not the caller), so a command that gates several forms on the same data says it once.
    """
    if samples < MIN_GATE_SAMPLES:
        warnings.warn(
            f"the accuracy gate measures on {samples} sample(s), fewer than {MIN_GATE_SAMPLES} "
            "(trainfer.serve.gate.MIN_GATE_SAMPLES): its verdict says little about other inputs; "
            "pass more held-out data (CLI: --gate-data, --validation, --data)",
            UserWarning,
            stacklevel=1,
        )
