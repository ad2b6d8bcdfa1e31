"""Accuracy-aware int8: trainfer.quantize's gated float-fallback search against NNCF's quantize_with_accuracy_control.

On digits_net trained on scikit-learn's digits (the demo's fixed train/validation/test split), both
quantizers get the same float deploy form (as one ONNX file), the same calibration inputs (the first
``--calibration`` training images), the same validation data (the validation split, with labels) and
the same criterion: validation accuracy may drop at most ``--max-drop`` points below the float form's.

* ``trainfer``: ``trainfer.quantize(..., gate=AccuracyGate(min_agreement=None, max_accuracy_drop=d),
  runtime="openvino")``: equalization (auto), ONNX Runtime's QDQ quantizer with the OpenVINO placement,
  gated on OpenVINO; on failure the most sensitive layers (output SQNR) go back to float one at a time;
* ``nncf``: ``nncf.quantize_with_accuracy_control(ov_model, ..., max_drop=d, drop_type=ABSOLUTE)`` on
  the OpenVINO model read from the same ONNX file; the validation function returns accuracy and the
  per-sample correctness (NNCF's "metric mode"); on failure NNCF ranks quantizer groups by their
  contribution to the drop and reverts them to float one at a time.

Both may revert every layer (``max_float_layers`` = all; NNCF's default ``max_num_iterations``).
Reported per quantizer: test accuracy (the held-out test split, which no search saw), its drop
against the float form on test, the validation drop the gate saw, how many of the quantizable layers
(Conv/MatMul) run in float, the search time (wall clock and process CPU time of the whole call), and
latency on OpenVINO: process CPU time at 1 thread, all forms interleaved call by call in a rotating
order, batch 1 and 64, median ms and the median of per-round ratios against float32 OpenVINO with a
95 % bootstrap interval.

``--outlier S`` makes the trained model quantization-hostile without changing its function: one output
channel of the last conv is multiplied by ``S`` there and its column of the linear head divided by ``S``
(exact: ReLU and average pooling are positively homogeneous), so that channel's activations dwarf the
others and the per-tensor activation range of the head's input loses resolution. trainfer's cross-layer
equalization undoes such scaling; ``--no-equalize`` adds a trainfer row without it (``trainfer-no-cle``)
to see its fallback search at work.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_int8_accuracy.py [--width 32] [--epochs 8] \
        [--max-drop 1.0 0.0] [--outlier 0] [--rounds 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import trainfer
from trainfer.bench import num_threads
from trainfer.bench.intervals import median_interval
from trainfer.demo import data
from trainfer.demo.train import fit
from trainfer.models import digits_net
from trainfer.serve import runtime as rt
from trainfer.serve.export import export
from trainfer.serve.onnx_runtime import read_onnx_manifest
from trainfer.serve.sensitivity import quantizable_layers

BASE = "float32/ov"


# --------------------------------------------------------------------------- the model
def train(width: int, epochs: int, seed: int) -> nn.Module:
    """digits_net trained as the demo does (AdamW 3e-3, cosine schedule, shift augmentation), deployed."""
    torch.manual_seed(seed)
    model = digits_net(width=width)
    loaders = data.loaders(64, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    fit(model, loaders.train, loaders.val, epochs, optimizer, scheduler=scheduler, progress=False)
    example = data.normalize(data.splits()["test"].pixels[:2])
    return trainfer.deploy(model.eval(), example)


@torch.no_grad()
def add_outliers(deployed: nn.Module, scale: float) -> nn.Module:
    """The same function with one activation channel before the head ``scale`` times larger (see module doc)."""
    layers = dict(quantizable_layers(deployed))
    conv, head = layers["stage2.1.reparam"], layers["head.3"]
    factors = torch.ones(conv.out_channels, dtype=conv.weight.dtype)
    factors[0] = scale
    conv.weight.mul_(factors[:, None, None, None])
    if conv.bias is not None:
        conv.bias.mul_(factors)
    head.weight.div_(factors[None, :])
    return deployed


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def logits(engine: Callable[[Tensor], Any], x: Tensor) -> Tensor:
    return torch.as_tensor(engine(x)).double()


# --------------------------------------------------------------------------- the two searches
def run_trainfer(deployed: nn.Module, calib: Tensor, val: tuple[Tensor, Tensor], drop: float, equalize: bool | str):
    """trainfer.quantize for OpenVINO, gated on validation accuracy only; (result, wall s, CPU s)."""
    gate = trainfer.AccuracyGate(min_agreement=None, max_accuracy_drop=drop)
    layers = len(quantizable_layers(deployed))
    wall, cpu = time.perf_counter(), time.process_time()
    result = trainfer.quantize(
        deployed,
        calib,
        validation=val[0],
        labels=val[1],
        gate=gate,
        runtime="openvino",
        max_float_layers=layers,
        equalize=equalize,
        calibration_limit=None,
    )
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_nncf(float_onnx: Path, calib: Tensor, val: tuple[Tensor, Tensor], drop: float):
    """nncf.quantize_with_accuracy_control on the OpenVINO model of ``float_onnx``; (ov.Model, wall s, CPU s)."""
    import nncf
    import openvino as ov

    def validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
        correct = []
        output = compiled.output(0)
        for x, label in items:
            correct.append(float(np.argmax(compiled(x)[output], -1)[0] == label))
        return float(np.mean(correct)), correct

    calibration = nncf.Dataset([x[None].numpy() for x in calib])
    validation = nncf.Dataset([(x[None].numpy(), int(y)) for x, y in zip(*val, strict=True)], lambda item: item[0])
    model = ov.Core().read_model(str(float_onnx))
    wall, cpu = time.perf_counter(), time.process_time()
    quantized = nncf.quantize_with_accuracy_control(
        model,
        calibration,
        validation,
        validate,
        max_drop=drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib),
    )
    return quantized, time.perf_counter() - wall, time.process_time() - cpu


def ov_float_layers(model: Any) -> tuple[int, int]:
    """(Convolution/MatMul ops whose weights are not quantized, all of them) in an OpenVINO model.

    NNCF may place an activation quantizer before a pooling op rather than before the layer, so a layer
    counts as int8 when its weight input comes (through Convert/Subtract/Multiply/Reshape) from a
    FakeQuantize or an 8-bit constant.
    """
    passing = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}

    def quantized_weights(op: Any) -> bool:
        node = op.input_value(1).get_node()
        while node.get_type_name() in passing:
            if node.get_type_name() == "Convert" and node.input_value(0).get_element_type().bitwidth <= 8:
                return True
            node = node.input_value(0).get_node()
        return node.get_type_name() == "FakeQuantize"

    layers = [op for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    return sum(not quantized_weights(op) for op in layers), len(layers)


# --------------------------------------------------------------------------- latency
def cpu_time_ratios(forms: dict[str, Callable], x: Tensor, rounds: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Process CPU time at 1 thread, forms interleaved in a rotating order: median ms and the median of
    per-round ratios to ``BASE`` with a 95 % bootstrap interval (2,000 resamples of the rounds)."""
    samples: dict[str, list[float]] = {name: [] for name in forms}
    names = list(forms)
    with torch.inference_mode():
        for form in forms.values():
            form(x)
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.process_time()
                for _ in range(repeats):
                    forms[name](x)
                samples[name].append((time.process_time() - start) / repeats)
    out = {}
    for name in names:
        ratios = [a / b for a, b in zip(samples[name], samples[BASE], strict=True)]
        out[name] = {
            "median_ms": 1e3 * statistics.median(samples[name]),
            "ratio": statistics.median(ratios),
            "ratio_ci95": list(median_interval(ratios)),
        }
    return out


# --------------------------------------------------------------------------- one comparison
def compare(deployed: nn.Module, args: argparse.Namespace, drop_points: float, work: Path) -> dict[str, Any]:
    parts = data.splits()
    calib = data.normalize(parts["train"].pixels[: args.calibration])
    val = (data.normalize(parts["val"].pixels), parts["val"].labels)
    test = (data.normalize(parts["test"].pixels), parts["test"].labels)
    drop = drop_points / 100
    float_onnx = work / "float.onnx"
    export(deployed, float_onnx, "onnx", example_inputs=calib[:2])
    manifest = read_onnx_manifest(float_onnx)
    float_engine = rt.OpenVinoEngine(float_onnx, manifest, 1)
    float_val, float_test = (accuracy(logits(float_engine, x), y) for x, y in (val, test))
    rows: dict[str, dict[str, Any]] = {}
    engines: dict[str, Callable] = {BASE: float_engine}

    variants = [("trainfer", "auto")] + ([("trainfer-no-cle", False)] if args.no_equalize else [])
    for name, equalize in variants:
        try:
            with num_threads(args.search_threads):
                q, wall, cpu = run_trainfer(deployed, calib, val, drop, equalize)
        except trainfer.QuantizationError as error:
            rows[name] = {"error": f"QuantizationError: {error}"}
            continue
        path = work / f"{name}.onnx"
        path.write_bytes(q.onnx_bytes)
        engines[f"{name}/ov"] = rt.OpenVinoEngine(path, manifest, 1)
        rows[name] = {
            "float_layers": len(q.report.float_layers),
            "float_layer_names": q.report.float_layers,
            "val_drop": q.report.gate.accuracy_drop,
            "attempts": q.report.attempts,
            "equalized": q.report.settings["equalized"],
            "search_wall_s": wall,
            "search_cpu_s": cpu,
        }

    try:
        model, wall, cpu = run_nncf(float_onnx, calib, val, drop)
    except Exception as error:  # noqa: BLE001 - a refusal (e.g. the drop cannot be met) is a result to report
        rows["nncf"] = {"error": f"{type(error).__name__}: {error}"}
    else:
        import openvino as ov

        ov.save_model(model, str(work / "nncf.xml"), compress_to_fp16=False)
        engines["nncf/ov"] = rt.OpenVinoEngine(work / "nncf.xml", manifest, 1)
        float_count, total = ov_float_layers(model)
        rows["nncf"] = {
            "float_layers": float_count,
            "val_drop": float_val - accuracy(logits(engines["nncf/ov"], val[0]), val[1]),
            "search_wall_s": wall,
            "search_cpu_s": cpu,
        }
    for name, row in rows.items():
        engine = engines.get(f"{name}/ov")
        if engine is not None:
            test_accuracy = accuracy(logits(engine, test[0]), test[1])
            row.update(test_accuracy=test_accuracy, test_drop=float_test - test_accuracy)
            row["test_agreement"] = float(
                (logits(engine, test[0]).argmax(-1) == logits(float_engine, test[0]).argmax(-1)).double().mean()
            )
    latency = {}
    with num_threads(1):
        for batch in args.batches:
            x = test[0][:batch] if batch <= len(test[0]) else test[0].repeat(batch // len(test[0]) + 1, 1, 1, 1)[:batch]
            latency[batch] = cpu_time_ratios(engines, x, args.rounds, 20 if batch == 1 else 2)
    return {
        "max_drop_points": drop_points,
        "float": {"val_accuracy": float_val, "test_accuracy": float_test, "layers": len(quantizable_layers(deployed))},
        "quantizers": rows,
        "latency_cpu_1_thread": latency,
    }


def table(result: dict[str, Any]) -> str:
    batches = sorted(result["latency_cpu_1_thread"])
    head = ["quantizer", "test acc %", "test drop pts", "val drop pts", "layers in float", "search s (wall / CPU)"]
    head += [f"batch {b}: ms, x float32 OV [95 % CI]" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = result["float"]
    cells = ["float32 (OpenVINO)", f"{100 * f['test_accuracy']:.2f}", "-", "-", f"{f['layers']} / {f['layers']}", "-"]
    for b in batches:
        cells.append(f"{result['latency_cpu_1_thread'][b][BASE]['median_ms']:.3f}, 1.00")
    lines.append("| " + " | ".join(cells) + " |")
    for name, row in result["quantizers"].items():
        if "error" in row:
            lines.append(f"| {name} | refused: {row['error'][:120]} |")
            continue
        cells = [
            name,
            f"{100 * row['test_accuracy']:.2f}",
            f"{100 * row['test_drop']:.2f}",
            f"{100 * row['val_drop']:.2f}",
            f"{row['float_layers']} / {f['layers']}",
            f"{row['search_wall_s']:.1f} / {row['search_cpu_s']:.1f}",
        ]
        for b in batches:
            t = result["latency_cpu_1_thread"][b][f"{name}/ov"]
            low, high = t["ratio_ci95"]
            cells.append(f"{t['median_ms']:.3f}, {t['ratio']:.2f} [{low:.2f}, {high:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
            if line.startswith("Model name")
        ),
        "unknown",
    )
    return {"cpu": model, "load_average": Path("/proc/loadavg").read_text().split()[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outlier", type=float, default=0.0, help="Activation outlier factor (0: none).")
    parser.add_argument("--no-equalize", action="store_true", help="Also run trainfer without equalization.")
    parser.add_argument("--max-drop", nargs="+", type=float, default=[1.0, 0.0], help="Allowed drop, points.")
    parser.add_argument("--calibration", type=int, default=300, help="Training images to calibrate on.")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--search-threads", type=int, default=1, help="torch threads during trainfer's search.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    import nncf
    import openvino

    info = {**machine(), "nncf": nncf.__version__, "openvino": openvino.__version__, "torch": torch.__version__}
    print(f"machine: {info}")
    deployed = train(args.width, args.epochs, args.seed)
    if args.outlier:
        deployed = add_outliers(deployed, args.outlier)
    results = []
    for drop in args.max_drop:
        with tempfile.TemporaryDirectory(prefix="int8-accuracy-") as work:
            result = compare(deployed, args, drop, Path(work))
        results.append(result)
        setup = f"digits_net width {args.width}, {args.epochs} epochs, outlier {args.outlier}"
        print(f"\n### max drop {drop} points (validation), {setup}")
        print(table(result))
    info["load_average_after"] = machine()["load_average"]
    if args.out:
        record = {"args": vars(args), "machine": info, "results": results}
        args.out.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
