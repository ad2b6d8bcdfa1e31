"""The accuracy gate: may a reduced form (bf16, fp16, int8, pruned) replace the reference form?

Exactness cannot be asked of a reduced form, so the check becomes figures a user can read, measured
on data the user gives (or random inputs where none is given). What is compared depends on what the
output means (:class:`GateOutput`, read from the bundle's one head by :func:`gate_output`):

* **classification** (``(N, C)``, ``C >= 2``; also a binary model's two-column output):
  ``agreement``, the share of samples whose predicted class (argmax) is the reference's, and with
  labels (class indices) ``accuracy_drop``, reference accuracy minus candidate accuracy;
* **binary** (one score per sample, ``(N,)`` or ``(N, 1)``): ``agreement`` of the *decisions*
  (probability >= :data:`BINARY_THRESHOLD`, i.e. logit >= 0, as the Predictor decides), and with 0/1
  labels ``accuracy_drop``;
* **regression**: ``rms_error``, the root-mean-square of ``candidate - reference`` over the gate's
  samples in standard deviations of the reference outputs (per output column, the worst column: the
  spread of what the model predicts, so an output such as a mass near 20 +- 2 is judged by its 2, not its
  20; 0.1 means the candidate explains 99 % of the reference outputs' variance, R^2 >= 0.99), and with
  real-valued targets as labels ``mae_increase``, how much larger the candidate's mean absolute error
  against the targets is than the reference's (0.1 = 10 % larger);
* any output: ``max_rel_error``, ``max |candidate - reference| / max |reference|`` (infinite when the
  candidate's outputs hold NaN or inf: such a candidate fails the gate, whatever its limits).

:class:`AccuracyGate` holds the limits (defaults: agreement >= 99 %, accuracy drop <= 0.5 points;
regression: RMS error <= :data:`DEFAULT_RMS_ERROR` standard deviations, MAE increase <= 10 %;
no limit on the relative error) and :func:`gate_report` measures a candidate against them. A gate
whose limits leave nothing to compare for an output (every applicable limit ``None``) is refused
(:class:`~trainfer.errors.InputError`), never passed. Each gate compares a candidate with the form
it was made from: pruning then quantizing passes two gates whose losses add up.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trainfer.errors import InputError
from trainfer.serve.calibration import class_indices, label_column

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = [
    "BINARY_THRESHOLD",
    "DEFAULT_RMS_ERROR",
    "GATE_TASKS",
    "MIN_GATE_SAMPLES",
    "AccuracyGate",
    "GateOutput",
    "GateReport",
    "gate_labels",
    "gate_output",
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
#: The tasks whose outputs the gate compares (a sequence bundle is refused earlier:
#: :func:`~trainfer.serve.source.check_class_gate`).
GATE_TASKS = ("classification", "binary", "regression")
#: The probability from which a binary output decides "yes" (the Predictor's default threshold).
BINARY_THRESHOLD = 0.5
#: The default limit on a regression output's RMS error, in standard deviations of the reference outputs:
#: the candidate must explain 99 % of their variance.
DEFAULT_RMS_ERROR = 0.1
#: Where each binary output kind crosses :data:`BINARY_THRESHOLD`.
_DECISION_POINT = {"logits": 0.0, "probabilities": BINARY_THRESHOLD, "log_probabilities": math.log(BINARY_THRESHOLD)}


@dataclass(frozen=True)
class AccuracyGate:
    """Limits a reduced form must meet; ``None`` switches a check off.

    Classification and binary outputs: ``min_agreement`` (a fraction of the samples) and
    ``max_accuracy_drop`` (a fraction: 0.005 = 0.5 percentage points; only when labels are given).
    Regression outputs: ``max_rms_error`` (the root-mean-square error in standard deviations of the
    reference outputs) and ``max_mae_increase`` (a fraction of the reference's mean absolute error
    against real-valued targets; only when labels are given). Any output: ``max_rel_error``.
    """

    min_agreement: float | None = 0.99
    max_accuracy_drop: float | None = 0.005
    max_rel_error: float | None = None
    max_rms_error: float | None = DEFAULT_RMS_ERROR
    max_mae_increase: float | None = 0.1

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_accuracy_drop", "max_rel_error", "max_rms_error", "max_mae_increase"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value >= 0):
                raise InputError(f"{name} must be a non-negative number or None; got {value!r}")
        if self.min_agreement is not None and self.min_agreement > 1:
            raise InputError(f"min_agreement is a fraction in [0, 1]; got {self.min_agreement}")

    def check_compares(self, task: str, labelled: bool) -> None:
        """Refuse (:class:`InputError`) limits that leave nothing to compare on a ``task`` output."""
        if task == "regression":
            limits = {"max_rms_error": self.max_rms_error, "max_rel_error": self.max_rel_error}
            labelled_limit = {"max_mae_increase": self.max_mae_increase}
            needs = "labels (real-valued targets) with max_mae_increase"
            anything = "max_rms_error=math.inf"
        else:
            limits = {"min_agreement": self.min_agreement, "max_rel_error": self.max_rel_error}
            labelled_limit = {"max_accuracy_drop": self.max_accuracy_drop}
            needs = "labels (class indices) with max_accuracy_drop"
            anything = "min_agreement=0.0"
        if labelled:
            limits.update(labelled_limit)
        if all(value is None for value in limits.values()):
            raise InputError(
                f"this accuracy gate compares nothing on a {task} output (every limit that applies is None: "
                f"{', '.join(limits)}): set one of them, or give {needs} "
                f"({anything} passes any candidate, deliberately)"
            )


@dataclass(frozen=True)
class GateOutput:
    """What the gated output means: its ``task`` (:data:`GATE_TASKS`), output ``kind`` (binary decisions) and,
    for regression, the target scaling the Predictor undoes (``target_mean``/``target_std``, per column), so
    that targets given as labels are compared with the values a user is served."""

    task: str = "classification"
    kind: str = "logits"
    target_mean: tuple[float, ...] | None = None
    target_std: tuple[float, ...] | None = None

    def served_values(self, outputs: Tensor) -> Tensor:
        """A regression output as served: ``outputs * target_std + target_mean``
        (:meth:`~trainfer.serve.preprocess.PreprocessSpec.unscale_target`)."""
        from trainfer.serve.preprocess import PreprocessSpec

        return PreprocessSpec(target_mean=self.target_mean, target_std=self.target_std).unscale_target(outputs)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse (:class:`InputError`) outputs of ``shape`` the gate could only compare vacuously."""
        columns = shape[1] if len(shape) == 2 else None
        if self.task == "classification" and (columns is None or columns < 2):
            raise InputError(
                f"the accuracy gate compares classes, but this classification output has shape {shape} (one column "
                "has one class, which always agrees): save it with trainfer.save(model, path, task='binary') "
                "(one logit) or task='regression', and gate the bundle"
            )
        if self.task == "binary" and not (len(shape) == 1 or columns in (1, 2)):
            raise InputError(
                f"the accuracy gate compares one binary decision per sample; got outputs of shape {shape} (a "
                "multi-label output is not a task trainfer serves): expected (N,), (N, 1) or (N, 2)"
            )

    def decisions(self, outputs: Tensor) -> Tensor:
        """Each sample's class or decision (int64 ``(N,)``) of a classification or binary output."""
        if outputs.dim() == 2 and outputs.shape[1] >= 2:
            return outputs.argmax(-1)
        return (outputs.reshape(len(outputs)) >= _DECISION_POINT[self.kind]).long()


def gate_output(manifest: Manifest) -> GateOutput:
    """The :class:`GateOutput` of a bundle's manifest; refuses (:class:`InputError`) what one gate cannot
    compare: several heads, or one output picked from a tuple or dict."""
    heads, structure = manifest.heads, manifest.output_structure
    if len(heads) != 1 or (structure is not None and structure.type != "tensor"):
        what = f"{len(heads)} heads" if len(heads) != 1 else f"a {structure.type}"  # type: ignore[union-attr]
        raise InputError(
            f"the accuracy gate compares one output tensor; this model returns {what}: serve it in float32 "
            "(trainfer deploy), or gate a model that returns its one output"
        )
    head, preprocess = heads[0], manifest.preprocess
    if head.task not in GATE_TASKS:
        raise InputError(f"the accuracy gate compares {', '.join(GATE_TASKS)} outputs; this head is {head.task!r}")
    if head.task != "regression" or preprocess is None:
        return GateOutput(head.task, head.output_kind or "logits")
    mean, std = preprocess.target_mean, preprocess.target_std
    return GateOutput(head.task, "logits", *(None if v is None else tuple(v) for v in (mean, std)))


def gate_labels(labels: Any, output: GateOutput, shape: tuple[int, ...], gate: AccuracyGate) -> Tensor | None:
    """``labels`` checked for outputs of ``shape`` (``(N, ...)``) of ``output``'s task, as the gate reads them
    (``None`` stays ``None``), once the outputs and ``gate`` are checked to compare something.

    Classification: class indices of the ``C`` classes; binary: 0/1 (integers or booleans);
    regression: real-valued targets, ``(N,)`` or the outputs' shape, finite (returned as float64 in the
    outputs' shape). Refuses anything else (:class:`InputError`, one line): every gating operation calls
    this before it builds a candidate.
    """
    output.check_shape(shape)
    gate.check_compares(output.task, labels is not None)
    if labels is None:
        return None
    count = shape[0]
    if output.task == "classification":
        return class_indices(labels, shape[1], count)
    if output.task == "binary":
        boolean = isinstance(labels, Tensor | np.ndarray) and labels.dtype in (torch.bool, np.bool_)
        return class_indices(torch.as_tensor(labels).long() if boolean else labels, 2, count)
    try:
        values = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"labels must be real-valued targets; got {type(labels).__name__}: {error}") from None
    if values.dtype == torch.bool or values.is_complex():
        raise InputError(f"labels of a regression output must be real-valued targets; got dtype {values.dtype}")
    values = values.double()
    if values.numel() != math.prod(shape) or values.dim() == 0 or label_column(values).shape[0] != count:
        raise InputError(
            f"labels must hold one target per output value: shape {shape} (or ({count},) for one column); "
            f"got shape {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise InputError("labels (regression targets) must be finite; got NaN or inf")
    return values.reshape(shape)


@dataclass(frozen=True)
class GateReport:
    """The figures of one candidate against the reference, and the verdict of the gate.

    ``agreement`` is ``None`` on a regression output, ``rms_error`` on any other; the accuracies
    need class labels, the mean absolute errors (``reference_mae``, ``candidate_mae``) real targets.
    """

    gate: AccuracyGate
    samples: int
    max_rel_error: float
    agreement: float | None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    task: str = "classification"
    rms_error: float | None = None
    reference_mae: float | None = None
    candidate_mae: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        """Reference minus candidate accuracy (a fraction), ``None`` without labels."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.reference_accuracy - self.candidate_accuracy

    @property
    def mae_increase(self) -> float | None:
        """Candidate over reference mean absolute error, minus 1 (``inf`` from a perfect reference), ``None``
        without targets."""
        if self.reference_mae is None or self.candidate_mae is None:
            return None
        if self.reference_mae == 0:
            return 0.0 if self.candidate_mae == 0 else math.inf
        return self.candidate_mae / self.reference_mae - 1

    @property
    def damage(self) -> float:
        """One figure, higher = further from the reference: the accuracy drop (or MAE increase) where labels
        were given, else the disagreement (or, for regression, the RMS error)."""
        labelled = self.accuracy_drop if self.task != "regression" else self.mae_increase
        if labelled is not None:
            return labelled
        if self.agreement is not None:
            return 1 - self.agreement
        return self.rms_error if self.rms_error is not None else self.max_rel_error

    def failures(self) -> list[str]:
        """One sentence per limit that is not met (empty: the gate passes)."""
        gate, problems = self.gate, []
        if self.samples < 1:
            problems.append("measured on no samples")
        what = "decision" if self.task == "binary" else "class"
        if gate.min_agreement is not None and self.agreement is not None and self.agreement < gate.min_agreement:
            problems.append(f"{what} agreement {self.agreement:.2%} < required {gate.min_agreement:.2%}")
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
        value = self.rms_error
        if gate.max_rms_error is not None and value is not None and not value <= gate.max_rms_error:
            problems.append(
                f"RMS output error {value:.3g} standard deviations of the reference outputs > allowed "
                f"{gate.max_rms_error:g}"
            )
        increase = self.mae_increase
        if gate.max_mae_increase is not None and increase is not None and increase > gate.max_mae_increase:
            problems.append(
                f"mean absolute error {self.reference_mae:.4g} -> {self.candidate_mae:.4g} (+{increase:.1%}) > "
                f"allowed +{gate.max_mae_increase:.1%}"
            )
        return problems

    @property
    def ok(self) -> bool:
        """Every limit is met."""
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, "ok": self.ok}

    def __str__(self) -> str:
        text = f"gate {'passed' if self.ok else 'FAILED'} on {self.samples} samples: "
        if self.agreement is not None:
            text += f"{'decision' if self.task == 'binary' else 'class'} agreement {self.agreement:.2%}, "
        if self.rms_error is not None:
            text += f"RMS error {self.rms_error:.3g} output std, "
        text += f"max rel error {self.max_rel_error:.2e}"
        if self.accuracy_drop is not None:
            text += (
                f", accuracy {self.reference_accuracy:.2%} (float) -> {self.candidate_accuracy:.2%} "
                f"(drop {100 * self.accuracy_drop:.2f} points)"
            )
        if self.mae_increase is not None:
            text += f", MAE {self.reference_mae:.4g} (reference) -> {self.candidate_mae:.4g} ({self.mae_increase:+.1%})"
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
    reference: Tensor,
    candidate: Tensor,
    labels: Tensor | None = None,
    gate: AccuracyGate | None = None,
    output: GateOutput | None = None,
) -> GateReport:
    """Measure ``candidate`` outputs against ``reference`` outputs (and ``labels``) of ``output``'s task
    (default: classification); see the module docstring. Refuses (:class:`InputError`) outputs or limits
    that would compare nothing."""
    gate, output = gate or AccuracyGate(), output or GateOutput()
    if reference.shape != candidate.shape:
        raise InputError(f"candidate outputs have shape {tuple(candidate.shape)}; expected {tuple(reference.shape)}")
    # a label no class can match would pass any accuracy drop (both forms miss it)
    labels = gate_labels(labels, output, tuple(reference.shape), gate)
    reference, candidate = reference.double(), candidate.double()
    scale = float(reference.abs().max()) or 1.0
    error = float((candidate - reference).abs().max()) / scale
    if not torch.isfinite(candidate).all():
        error = float("inf")
    if output.task == "regression":
        served = (output.served_values(reference), output.served_values(candidate))
        return GateReport(gate, len(reference), error, None, task="regression", **_values(*served, labels))
    predicted, expected = output.decisions(candidate), output.decisions(reference)
    agreement = float(torch.eq(predicted, expected).double().mean())
    accuracies: tuple[float | None, float | None] = (None, None)
    if labels is not None:
        labels = labels.to(predicted.device)
        accuracies = (
            float(torch.eq(expected, labels).double().mean()),
            float(torch.eq(predicted, labels).double().mean()),
        )
    return GateReport(gate, len(reference), error, agreement, *accuracies, task=output.task)


def _values(reference: Tensor, candidate: Tensor, targets: Tensor | None) -> dict[str, float | None]:
    """A regression output's figures: the RMS error (per column, in the reference outputs' standard deviation,
    or their largest magnitude, at least 1, where they do not vary; the worst column) and the mean absolute
    errors against ``targets``."""
    columns = reference.reshape(len(reference), -1)
    spread = columns.std(0, unbiased=False) if len(columns) > 1 else torch.zeros(columns.shape[1:], dtype=torch.float64)
    spread = torch.where(spread > 0, spread, columns.abs().amax(0).clamp(min=1.0))
    rms = (candidate.reshape(columns.shape) - columns).square().mean(0).sqrt()
    rms_error = float((rms / spread).max()) if len(columns) else 0.0
    figures: dict[str, float | None] = {"rms_error": rms_error if math.isfinite(rms_error) else math.inf}
    if targets is not None:
        figures["reference_mae"] = float((reference - targets).abs().mean())
        figures["candidate_mae"] = float((candidate - targets).abs().mean())
    return figures


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
