"""The demo's serving step: the auto-chosen runtime and the gated int8 form beside the float forms.

:func:`serving` takes the demo's deploy-form bundle and the digits splits and

1. runs ``trainfer.compile(bundle, runtime="auto")`` (float32 candidates measured paired at batch 1
   and 256) and records the choice in the bundle (``runtime.json``);
2. quantizes the bundle with ``trainfer.quantize`` (calibration: training digits; gate: the validation
   split with labels, so that the test split the forms are then measured on had no say in the
   verdict) into ``bundle_int8/`` (a refusal by the gate is reported, not raised);
3. measures each form on the test set: accuracy, latency at batch 1 and throughput at batch 256
   (all forms paired call by call, :func:`trainfer.bench.time_forms`), and size on disk.

:func:`plot_serving` and :func:`section` render the results for the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainfer.bench import time_forms

THROUGHPUT_BATCH = 256

__all__ = ["plot_serving", "section", "serving"]


def serving(
    deploy_bundle: Path,
    work: Path,
    validation: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    calibration: Tensor,
    repeats: int,
) -> dict[str, Any]:
    """Compile, quantize and measure (see the module docstring); returns the JSON-able results.

    ``validation`` and ``test``: ``(inputs, labels)`` of the split the int8 gate measures on and of
    the split every form's accuracy and speed are measured on."""
    from trainfer.serve.bundle import load
    from trainfer.serve.quantize import QuantizationError, quantize
    from trainfer.serve.runtime import compile, save_record

    inputs, labels = test
    auto = compile(deploy_bundle, runtime="auto", batch_sizes=(1, THROUGHPUT_BATCH), rounds=max(3, repeats // 5))
    save_record(deploy_bundle, auto.record)
    float_bytes = (deploy_bundle / "model.safetensors").stat().st_size
    chosen = f"auto: {auto.record.runtime}/{auto.record.dtype}"
    forms: dict[str, Any] = {"deploy form, eager float32": load(deploy_bundle).eval(), chosen: auto}
    sizes = {"deploy form, eager float32": float_bytes, chosen: float_bytes}
    try:
        int8 = quantize(deploy_bundle, calibration, validation=validation[0], labels=validation[1])
    except QuantizationError as refusal:  # a result worth showing: the gate said no, and why
        quantization, gate, bundle = f"refused: {refusal}\n{refusal.report}", refusal.report.gate.to_dict(), None
    else:
        int8_bundle = int8.save(work / "bundle_int8")
        forms["int8 (ONNX Runtime, QDQ)"], sizes["int8 (ONNX Runtime, QDQ)"] = int8, len(int8.onnx_bytes)
        quantization, gate, bundle = str(int8.report), int8.report.gate.to_dict(), f"{int8_bundle.name}/"
    latency = time_forms(forms, inputs[:1], rounds=3, repeats=max(1, repeats // 3), warmup=2)
    bulk = time_forms(forms, inputs[:THROUGHPUT_BATCH], rounds=3, repeats=max(1, repeats // 10), warmup=1)
    measured = {}
    for name, form in forms.items():
        with torch.inference_mode():
            predicted = torch.cat([form(chunk) for chunk in inputs.split(THROUGHPUT_BATCH)]).argmax(1)
        measured[name] = {
            "accuracy": float((predicted == labels).double().mean()),
            "latency_ms": 1e3 * latency[name].median_s,
            "throughput": THROUGHPUT_BATCH / bulk[name].median_s,
            "bytes": sizes[name],
        }
    return {
        "forms": measured,
        "runtime_table": auto.record.table(),
        "quantization": quantization,
        "gate": gate,
        "bundle": bundle,
    }


def plot_serving(results: dict[str, Any]) -> Any:
    """Latency at batch 1, throughput at batch 256 and test accuracy per served form."""
    from matplotlib.figure import Figure

    forms = results["forms"]
    names = list(forms)
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    panels = (
        ("latency_ms", "latency at batch 1 (ms)", 1),
        ("throughput", f"throughput at batch {THROUGHPUT_BATCH} (/s)", 1),
        ("accuracy", "test accuracy (%)", 100),
    )
    for axis, (key, title, factor) in zip(axes, panels, strict=True):
        values = [factor * forms[name][key] for name in names]
        axis.barh(names, values, color=["tab:gray", "tab:blue", "tab:green"][: len(names)])
        axis.set(title=title)
        axis.grid(alpha=0.3, axis="x")
        if key == "accuracy":
            axis.set_xlim(max(0.0, min(values) - 5), 100)
    for axis in axes[1:]:
        axis.set_yticklabels([])
    return figure


def section(results: dict[str, Any]) -> str:
    """The report's markdown section (``results["serving"]``, or why it was skipped)."""
    serving_results = results.get("serving")
    title = "## Serving: the fastest verified runtime and the int8 form"
    if serving_results is None:
        reason = (results.get("skipped") or {}).get("serving")
        return f"{title}\n\n_Skipped: {reason}_" if reason else ""
    rows = [
        f"| {name} | {100 * f['accuracy']:.2f} % | {f['latency_ms']:.3f} | {f['throughput']:,.0f} | "
        f"{f['bytes'] / 1024:.1f} KiB |"
        for name, f in serving_results["forms"].items()
    ]
    table = "\n".join(
        ["| form | test accuracy | latency b=1 (ms) | throughput b=256 (/s) | size on disk |", "|---|---|---|---|---|"]
        + rows
    )
    return (
        f'{title}\n\n{table}\n\nCandidates of `trainfer.compile(runtime="auto")` (latency x eager float32, '
        f"paired in one run):\n\n```\n{serving_results['runtime_table']}\n```\n\n"
        f"`trainfer.quantize`, gated on the validation split "
        f"(int8 bundle: `{serving_results['bundle'] or 'none, the gate refused'}`):\n\n"
        f"```\n{serving_results['quantization']}\n```\n\n![serving](serving.png)"
    )
