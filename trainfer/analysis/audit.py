"""Audit a model for mode risks: what depends on the mode, what is in an odd mode, what never trained.

:func:`audit` never changes the model: the optional train-vs-eval comparison runs on deep copies
and restores the random number generators afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainfer.analysis.inspection import as_forward_args
from trainfer.errors import InputTypeError
from trainfer.modes.contexts import inference, mode_dependent_modules, training
from trainfer.numerics import relative_error

__all__ = ["AuditReport", "Divergence", "Finding", "audit"]

#: Finding kinds, in the order the report lists them.
KINDS = ("training-mode", "train-eval-divergence", "untrained-batchnorm", "mode-mismatch", "mode-dependent")


@dataclass(frozen=True)
class Finding:
    """One line of the report: what (``kind``, one of :data:`KINDS`), where, and why it matters."""

    kind: str
    module: str  # qualified name; "" is the model itself
    module_type: str
    detail: str


@dataclass(frozen=True)
class Divergence:
    """How far a training-mode forward is from an eval-mode forward on the same inputs.

    ``max_rel_error`` is ``max |train - eval| / max |eval|``. For 2-D outputs with several columns
    (logits), ``argmax_agreement`` is the fraction of rows whose argmax agrees and ``classes_train`` /
    ``classes_eval`` count the distinct argmax values (1 in training mode: collapsed predictions).
    """

    max_rel_error: float
    inputs: int
    argmax_agreement: float | None = None
    classes_train: int | None = None
    classes_eval: int | None = None

    def __str__(self) -> str:
        text = f"max relative error {self.max_rel_error:.3g}"
        if self.argmax_agreement is not None:
            text += (
                f"; argmax agrees on {100 * self.argmax_agreement:.0f} % of {self.inputs} inputs"
                f" (distinct classes: train {self.classes_train}, eval {self.classes_eval})"
            )
        return text


@dataclass
class AuditReport:
    """The findings of :func:`audit`: print it for a table, or read ``findings`` / ``to_dict()``."""

    model_type: str
    training: bool
    findings: list[Finding] = field(default_factory=list)
    divergence: Divergence | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "model_type": self.model_type,
            "training": self.training,
            "findings": [asdict(finding) for finding in self.findings],
            "divergence": None if self.divergence is None else asdict(self.divergence),
        }

    def __str__(self) -> str:
        mode = "training" if self.training else "eval"
        title = f"audit of {self.model_type} (in {mode} mode): {len(self.findings)} finding(s)"
        rows = [("finding", "module", "type", "detail")]
        rows += [(f.kind, f.module or "(model)", f.module_type, f.detail) for f in self.findings]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * len("detail"))
        return "\n".join([title, *lines])


def audit(model: nn.Module, example_inputs: Tensor | Sequence[Any] | None = None, seed: int = 0) -> AuditReport:
    """Report ``model``'s mode risks; with ``example_inputs``, also measure train-vs-eval outputs.

    Findings: every mode-dependent module and how it depends on the mode (``mode-dependent``);
    modules in another mode than their parent (``mode-mismatch``); BatchNorm whose running statistics
    were never updated (``untrained-batchnorm``); mode-dependent modules left in training mode
    (``training-mode``); and the output difference a forgotten ``eval()`` causes
    (``train-eval-divergence``). ``example_inputs`` is a tensor or a sequence of positional inputs;
    ``seed`` seeds the Dropout draws of that comparison (the caller's RNG state is left as it was).
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"audit expects a torch.nn.Module; got {type(model).__name__}")
    findings = _dependence_findings(model) + _mismatch_findings(model) + _batchnorm_findings(model)
    divergence = None
    if example_inputs is not None:
        divergence_finding, divergence = _divergence_finding(model, as_forward_args(example_inputs), seed)
        findings.append(divergence_finding)
    findings.sort(key=lambda finding: KINDS.index(finding.kind))
    return AuditReport(type(model).__name__, model.training, findings, divergence)


def _dependence_findings(model: nn.Module) -> list[Finding]:
    dependent = mode_dependent_modules(model)
    findings = [
        Finding("mode-dependent", d.name, type(d.module).__name__, f"{d.how} (now {_mode(d.module)})")
        for d in dependent
    ]
    training_now = [d.name or "(model)" for d in dependent if d.module.training]
    if training_now:
        shown = ", ".join(training_now[:5]) + (f" and {len(training_now) - 5} more" if len(training_now) > 5 else "")
        findings.append(
            Finding(
                "training-mode",
                "",
                type(model).__name__,
                f"{len(training_now)} mode-dependent module(s) in training mode ({shown}): predictions made now "
                "use batch statistics / dropout; predict inside trainfer.inference(model) or after model.eval()",
            )
        )
    return findings


def _mismatch_findings(model: nn.Module) -> list[Finding]:
    modules = dict(model.named_modules())
    findings = []
    for name, module in modules.items():
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name) if name else None
        if parent is not None and parent.training != module.training:
            findings.append(
                Finding(
                    "mode-mismatch",
                    name,
                    type(module).__name__,
                    f"in {_mode(module)} mode inside {parent_name or '(model)'}, which is in {_mode(parent)} mode",
                )
            )
    return findings


def _batchnorm_findings(model: nn.Module) -> list[Finding]:
    findings = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            reason = _untrained_reason(module)
            if reason is not None:
                findings.append(Finding("untrained-batchnorm", name, type(module).__name__, reason))
    return findings


def _untrained_reason(norm: nn.modules.batchnorm._NormBase) -> str | None:
    """Why ``norm``'s running statistics look never updated, or ``None`` if they look trained (or it keeps none)."""
    mean, var = norm.running_mean, norm.running_var
    if mean is None or var is None:
        return None
    if nn.parameter.is_lazy(mean):
        return "running statistics not even allocated yet (lazy module never ran): never trained"
    if bool((mean == 0).all() and (var == 1).all()):
        return "running statistics at their initial values (mean 0, var 1): never trained, or not loaded"
    if norm.num_batches_tracked is not None and int(norm.num_batches_tracked) == 0:
        return "num_batches_tracked is 0 though the statistics are set: loaded from a checkpoint without it?"
    return None


def _divergence_finding(model: nn.Module, args: tuple[Any, ...], seed: int) -> tuple[Finding, Divergence | None]:
    """One forward of a copy of ``model`` in each mode (a progress bar on a terminal counts them), compared."""
    outputs = {}
    with tqdm(total=2, desc="audit", unit="pass", disable=None) as bar:
        for mode, context in (("train", training), ("eval", inference)):
            replica = copy.deepcopy(model)
            with torch.random.fork_rng(), context(replica):
                torch.manual_seed(seed)
                try:
                    outputs[mode] = replica(*args)
                except (RuntimeError, ValueError) as error:  # e.g. BatchNorm, one value per channel, training
                    detail = f"{mode}-mode forward failed: {str(error).splitlines()[0]}"
                    return Finding("train-eval-divergence", "", type(model).__name__, detail), None
            bar.update()
    train, evaluated = outputs["train"], outputs["eval"]
    matched = _counterpart(train, evaluated)
    if matched is None:
        detail = f"outputs differ in kind: training returns {_describe(train)}, eval returns {_describe(evaluated)}"
        return Finding("train-eval-divergence", "", type(model).__name__, detail), None
    entry, compared = matched
    divergence = _compare(compared.detach(), evaluated)
    detail = str(divergence) if entry is None else f"training output [{entry!r}] vs eval output: {divergence}"
    return Finding("train-eval-divergence", "", type(model).__name__, detail), divergence


def _counterpart(train: Any, evaluated: Any) -> tuple[str | int | None, Tensor] | None:
    """The training-mode output that eval's tensor ``evaluated`` stands for, and its key (``None``: ``train`` itself).

    A tensor of the same shape is itself. A dict or tuple (a :class:`~trainfer.DualModule`'s training
    path with its auxiliary heads) gives its ``"logits"`` entry if of that shape, else its only entry
    of that shape. ``None`` when nothing fits or the choice is ambiguous.
    """
    if not isinstance(evaluated, Tensor):
        return None
    if isinstance(train, Tensor):
        return (None, train) if train.shape == evaluated.shape else None
    entries: dict[Any, Any] = dict(train) if isinstance(train, Mapping) else {}
    if isinstance(train, tuple | list):
        entries = dict(enumerate(train))
    fitting = {key: value for key, value in entries.items() if isinstance(value, Tensor)}
    fitting = {key: value for key, value in fitting.items() if value.shape == evaluated.shape}
    if "logits" in fitting:
        return "logits", fitting["logits"]
    return next(iter(fitting.items())) if len(fitting) == 1 else None


def _compare(train: Tensor, evaluated: Tensor) -> Divergence:
    train, evaluated = train.double(), evaluated.double()
    error = relative_error(train, evaluated)
    inputs = train.shape[0] if train.dim() else 1
    if train.dim() != 2 or train.shape[1] < 2:
        return Divergence(error, inputs)
    train_classes, eval_classes = train.argmax(1), evaluated.argmax(1)
    agreement = float((train_classes == eval_classes).double().mean())
    return Divergence(error, inputs, agreement, len(train_classes.unique()), len(eval_classes.unique()))


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, dict):
        return f"a dict with keys {sorted(map(str, output))}"
    return f"a {type(output).__name__}"


def _mode(module: nn.Module) -> str:
    return "training" if module.training else "eval"
