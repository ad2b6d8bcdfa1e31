"""The demo's pruning step: gated channel pruning of the deploy form, with and without fine-tuning, and int8.

:func:`pruning` takes the demo's deploy form and the digits splits and

1. prunes it with :func:`trainfer.prune` at each of :data:`RATIOS` of every layer's channels, once as
   it is and once fine-tuned for :data:`FINETUNE_EPOCHS` epochs on the training digits by the
   built-in loop (:class:`trainfer.serve.finetune.FinetuneLoop`, Adam, lr 1e-3: single-process, so
   it also runs on rank 0 of a torchrun job, where the demo's DDP loop would wait for the other
   ranks). Each candidate meets :data:`GATE` on the labelled validation digits; the search is off
   (a refused candidate is reported, not rescued: ``trainfer prune`` searches by default);
2. quantizes the deploy form and the passing pruned form with the fewest MACs with
   :func:`trainfer.quantize` (calibration: training digits; its default gate, on the validation
   digits); a refusal is reported;
3. measures every form that passed on the test digits: accuracy, MACs, and latency at batch 1 and
   256, all forms paired call by call in one run (:func:`trainfer.bench.time_forms`).

:func:`plot_pruning` (accuracy against latency) and :func:`section` render it for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from trainfer.bench import time_forms
from trainfer.errors import PruningError
from trainfer.serve.gate import AccuracyGate

__all__ = ["FINETUNE_EPOCHS", "GATE", "RATIOS", "plot_pruning", "pruning", "section"]

RATIOS = (0.3, 0.5, 0.7)
FINETUNE_EPOCHS = 3
#: Fine-tuning may repair what pruning breaks, so class agreement with the float form is not asked:
#: the validation accuracy may drop by at most one point.
GATE = AccuracyGate(min_agreement=None, max_accuracy_drop=0.01)
BATCHES = (1, 256)
#: Marker and colour of each kind of form in the plot.
STYLE = {
    "float": ("o", "tab:gray"),
    "int8": ("s", "tab:blue"),
    "pruned": ("^", "tab:orange"),
    "pruned + int8": ("D", "tab:green"),
}

Split = tuple[Tensor, Tensor]
#: A measured form: its kind (a key of :data:`STYLE`) and what runs it.
Form = tuple[str, Callable[[Tensor], Any]]


def pruning(deployed: nn.Module, train: Split, val: Split, test: Split, repeats: int) -> dict[str, Any]:
    """Prune, fine-tune, gate, quantize and measure (see the module docstring); JSON-able results."""
    from trainfer.serve.finetune import FinetuneLoop

    finetune = FinetuneLoop(*train, epochs=FINETUNE_EPOCHS, lr=1e-3)
    candidates, passed = [], {}
    for ratio in RATIOS:
        for tuned in (False, True):
            name = f"pruned {100 * ratio:.0f} %" + (" + fine-tuned" if tuned else "")
            record, model = _candidate(deployed, val, ratio, finetune if tuned else None)
            candidates.append({"name": name, "ratio": ratio, "finetuned": tuned, **record})
            if model is not None:
                passed[name] = model
    forms: dict[str, Form] = {"float (deploy form)": ("float", deployed)}
    forms |= {name: ("pruned", model) for name, model in passed.items()}
    to_quantize = {"int8": deployed}
    if passed:  # the passing pruned form with the fewest MACs
        smallest = min(passed, key={c["name"]: c["macs"][1] for c in candidates}.__getitem__)
        to_quantize[f"{smallest} + int8"] = passed[smallest]
    quantization = {}
    for name, model in to_quantize.items():
        int8, quantization[name] = _quantize(model, train, val)
        if int8 is not None:
            forms[name] = ("int8" if model is deployed else "pruned + int8", int8)
    return {
        "ratios": list(RATIOS),
        "gate": {"min_agreement": GATE.min_agreement, "max_accuracy_drop": GATE.max_accuracy_drop, "search": False},
        "finetune": {"epochs": FINETUNE_EPOCHS, "optimizer": "adam", "lr": finetune.lr, "samples": len(train[1])},
        "candidates": candidates,
        "quantization": quantization,
        "forms": _measure(forms, test, repeats),
    }


def _candidate(
    deployed: nn.Module, val: Split, ratio: float, finetune: Callable[[nn.Module], Any] | None
) -> tuple[dict[str, Any], nn.Module | None]:
    """One pruned candidate behind the gate: its report's figures, and the model if it passed."""
    from trainfer.serve.prune import PruneReport, prune

    model: nn.Module | None
    try:
        model = prune(
            deployed, val[0][:2], ratio=ratio, data=val[0], labels=val[1], gate=GATE, finetune=finetune, search=False
        )
        report = cast(PruneReport, model.trainfer_prune_report)
    except PruningError as refusal:
        model, report = None, cast(PruneReport, refusal.report)
    return {
        "verdict": "passed" if report.gate.ok else "refused",
        "gate": report.gate.to_dict(),
        "gate_text": str(report.gate),
        "macs": list(report.macs),  # per sample, (unpruned, pruned), counted by Torch-Pruning
        "parameters": list(report.parameters),
    }, model


def _quantize(model: nn.Module, train: Split, val: Split) -> tuple[Callable[[Tensor], Any] | None, str]:
    """The gated int8 form of ``model`` and its report, or ``None`` and the gate's refusal."""
    from trainfer.serve.quantize import QuantizationError, quantize

    try:
        int8 = quantize(model, train[0], validation=val[0], labels=val[1])
    except QuantizationError as refusal:
        return None, f"refused: {refusal}"
    return int8, str(int8.report)


def _measure(forms: dict[str, Form], test: Split, repeats: int) -> dict[str, Any]:
    """Test accuracy and latency per batch size, all forms paired."""
    inputs, labels = test
    callables = {name: call for name, (_, call) in forms.items()}
    timings = {
        batch: time_forms(callables, inputs[:batch], rounds=3, repeats=max(1, repeats // (3 if batch == 1 else 10)))
        for batch in BATCHES
    }
    measured = {}
    for name, (kind, call) in forms.items():
        with torch.inference_mode():
            predicted = torch.cat([call(chunk) for chunk in inputs.split(256)]).argmax(1)
        measured[name] = {
            "kind": kind,
            "accuracy": float((predicted == labels).double().mean()),
            **{f"latency_b{batch}_ms": 1e3 * timings[batch][name].median_s for batch in BATCHES},
        }
    return measured


def plot_pruning(results: dict[str, Any]) -> Any:
    """Test accuracy against latency at batch 1 and at batch 256, one point per form."""
    from matplotlib.figure import Figure

    forms = results["forms"]
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    axes = figure.subplots(1, len(BATCHES), sharey=True)
    for axis, batch in zip(axes, BATCHES, strict=True):
        for kind, (marker, color) in STYLE.items():
            chosen = {name: form for name, form in forms.items() if form["kind"] == kind}
            points = [(f[f"latency_b{batch}_ms"], 100 * f["accuracy"]) for f in chosen.values()]
            if points:
                axis.scatter(*zip(*points, strict=True), marker=marker, color=color, label=kind, s=50)
            for name, form in chosen.items():
                axis.annotate(_short(name), (form[f"latency_b{batch}_ms"], 100 * form["accuracy"]), fontsize=7,
                              xytext=(4, 4), textcoords="offset points")  # fmt: skip
        axis.set(xlabel=f"latency at batch {batch} (ms, median)", title=f"accuracy vs latency, batch {batch}")
        axis.grid(alpha=0.3)
    axes[0].set(ylabel="test accuracy (%)")
    axes[0].legend(fontsize=8)
    return figure


def section(results: dict[str, Any]) -> str:
    """The report's markdown section (``results["pruning"]``, or why it was skipped)."""
    title = "## Pruning: narrower layers behind the accuracy gate, and pruned + int8"
    pruned = results.get("pruning")
    if pruned is None:
        reason = (results.get("skipped") or {}).get("pruning")
        return f"{title}\n\n_Skipped: {reason}_" if reason else ""
    rows = [
        f"| {c['name']} | {_ratio(c['macs'])} | {_ratio(c['parameters'])} "
        f"| {_percent(c['gate']['candidate_accuracy'])} | {c['verdict']} |"
        for c in pruned["candidates"]
    ]
    forms = [
        f"| {name} | {f['kind']} | {_percent(f['accuracy'])} | "
        + " | ".join(f"{f[f'latency_b{batch}_ms']:.3f}" for batch in BATCHES)
        + " |"
        for name, f in pruned["forms"].items()
    ]
    gate, tune = pruned["gate"], pruned["finetune"]
    quantization = "\n\n".join(f"{name}:\n\n```\n{text}\n```" for name, text in pruned["quantization"].items())
    return (
        f"{title}\n\n`trainfer.prune` removed the lowest-magnitude channels of each layer of the deploy form "
        f"(Torch-Pruning's dependency graph), as it is and after {tune['epochs']} epochs of the built-in "
        f"fine-tuning loop ({tune['optimizer']}, lr {tune['lr']:g}, {tune['samples']} training digits). Gate: "
        f"validation accuracy drop <= {100 * gate['max_accuracy_drop']:.1f} points (no class-agreement limit: "
        "fine-tuning may repair what pruning broke); search off, so a refused candidate stays refused. "
        f"Validation accuracy of the float form: {_percent(pruned['candidates'][0]['gate']['reference_accuracy'])}.\n\n"
        "| candidate | MACs vs float | parameters vs float | validation accuracy | gate |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n{_forms_heading(pruned['candidates'])} (`trainfer.quantize`), on the test digits, paired:\n\n"
        "| form | kind | test accuracy | latency b=1 (ms) | latency b=256 (ms) |\n"
        "|---|---|---|---|---|\n" + "\n".join(forms) + f"\n\n{quantization}\n\n![pruning](pruning.png)"
    )


def _forms_heading(candidates: list[dict[str, Any]]) -> str:
    """What the table of measured forms holds: the passing pruned forms too, or only the float form."""
    if any(c["verdict"] == "passed" for c in candidates):
        return "The forms that passed and their int8 forms"
    return "No pruned form passed the gate: the float (deploy) form and its int8 form"


def _short(name: str) -> str:
    """A form's name as the plot labels it: ``pruned 30 % + fine-tuned + int8`` -> ``30 % ft + int8``."""
    return name.replace("pruned ", "").replace(" + fine-tuned", " ft").replace(" (deploy form)", "")


def _ratio(counts: list[int]) -> str:
    """``[unpruned, pruned]`` as the pruned share."""
    return _percent(counts[1] / counts[0])


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"
