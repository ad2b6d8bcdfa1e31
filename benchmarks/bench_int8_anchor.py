"""trainfer's int8 form against the NNCF anchor: OpenVINO int8 made by NNCF post-training quantization.

On repvgg_a0's deploy form (random weights, non-trivial BatchNorm statistics) at 224x224, these
forms of the same weights are timed in one run, interleaved call by call:

* ``eager/float32`` — the deploy form in eager PyTorch (the baseline of every ratio);
* ``nncf-ov/int8`` — NNCF ``nncf.quantize`` of the float ONNX read by OpenVINO (the anchor);
* ``trainfer-qdq/ort`` — ``trainfer.quantize``'s QDQ file for ONNX Runtime (``runtime="onnxruntime"``:
  quantizers on every conv's input and output, which ONNX Runtime fuses into QLinearConv) on ONNX Runtime;
* ``trainfer-qdq/ov`` — the same QDQ file on OpenVINO;
* ``trainfer-ovq/ov``, ``trainfer-ovq/ort`` — ``trainfer.quantize(runtime="openvino")``'s file (quantizers
  on conv and linear inputs only) on each runtime: trainfer's int8 form for the OpenVINO target;
* ``...8`` — the same with full 8-bit weights (``reduce_range=False``; trainfer's default on a CPU
  without VNNI is 7-bit weights, ONNX Runtime's advice there);
* ``nncf-onnx/ort``, ``nncf-onnx/ov`` — NNCF's ONNX backend (a QDQ ONNX file) on each runtime:
  it separates the quantizer's placement from the runtime that executes the file.

Two measurements, each its own interleaved run: wall clock with ``--threads`` threads (default 2)
and process CPU time with 1 thread (stable on a shared machine). Calibration is on random inputs
and every gate is open, so only the speed means anything. Prints ratios to eager float32 and the
ratio of each trainfer int8 form to the anchor (target: at most 1.05).

    .venv/bin/python benchmarks/bench_int8_anchor.py [--rounds 15] [--threads 2] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import trainfer
from trainfer.bench import num_threads
from trainfer.models import repvgg_a0
from trainfer.serve import runtime as rt
from trainfer.serve.export import export
from trainfer.serve.gate import AccuracyGate
from trainfer.serve.onnx_runtime import read_onnx_manifest
from trainfer.testing import randomize_batchnorm

ANCHOR = "nncf-ov/int8"
#: trainfer.quantize files: name, reduce_range (None: trainfer's default), the runtime it places quantizers for.
VARIANTS = (
    ("trainfer-qdq", None, "onnxruntime"),
    ("trainfer-qdq8", False, "onnxruntime"),
    ("trainfer-ovq", None, "openvino"),
    ("trainfer-ovq8", False, "openvino"),
)
BASE = "eager/float32"


def _trainfer_int8(
    deployed: torch.nn.Module, calibration: torch.Tensor, reduce_range: bool | None, runtime: str
) -> bytes:
    int8 = trainfer.quantize(
        deployed,
        calibration,
        validation=calibration[:8],
        gate=AccuracyGate(None, None, None),
        equalize=False,
        max_float_layers=0,
        sensitivity_samples=2,
        reduce_range=reduce_range,
        runtime=runtime,
    )
    return int8.onnx_bytes


def _nncf_files(float_onnx: Path, calibration: torch.Tensor, work: Path) -> dict[str, Path]:
    """NNCF's int8 forms of the float ONNX: the OpenVINO IR (OpenVINO backend) and a QDQ ONNX (ONNX backend)."""
    import nncf
    import onnx
    import openvino as ov

    items = [{"input": x[None].numpy()} for x in calibration]
    ov_model = nncf.quantize(ov.Core().read_model(str(float_onnx)), nncf.Dataset([i["input"] for i in items]))
    ov.save_model(ov_model, str(work / "nncf.xml"), compress_to_fp16=False)
    onnx_model = nncf.quantize(onnx.load(str(float_onnx)), nncf.Dataset(items))
    onnx.save(onnx_model, str(work / "nncf_qdq.onnx"))
    return {"ov": work / "nncf.xml", "onnx": work / "nncf_qdq.onnx"}


def build(deployed: torch.nn.Module, work: Path, threads: int, files: dict[str, Path]) -> dict[str, Callable]:
    """Every form, its engine built with ``threads`` intra-op threads."""
    manifest = read_onnx_manifest(files["float"])
    forms: dict[str, Callable[[torch.Tensor], Any]] = {BASE: rt.TorchEngine(deployed, torch.float32)}
    forms[ANCHOR] = rt.OpenVinoEngine(files["nncf-ov"], manifest, threads)
    for name in (*(key for key, _, _ in VARIANTS), "nncf-onnx"):
        forms[f"{name}/ort"] = rt.ort_engine(files[name], manifest, threads)
        forms[f"{name}/ov"] = rt.OpenVinoEngine(files[name], manifest, threads)
    return forms


def interleaved(forms: dict[str, Callable], x: torch.Tensor, rounds: int, clock: Callable[[], float]) -> dict:
    """Median seconds per call of each form by ``clock``, forms alternating call by call in a rotating order."""
    samples: dict[str, list[float]] = {name: [] for name in forms}
    with torch.no_grad():
        for form in forms.values():
            for _ in range(2):
                form(x)
        names = list(forms)
        for round_ in range(rounds):  # the order rotates each round: no form always follows the same one
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = clock()
                forms[name](x)
                samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, medians: dict[int, dict[str, float]]) -> None:
    batches = sorted(medians)
    print(f"\n### {title}")
    print("| form | " + " | ".join(f"batch {b}: ms, x eager, x anchor" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name in medians[batches[0]]:
        cells = []
        for b in batches:
            m = medians[b]
            cells.append(f"{1e3 * m[name]:.1f}, {m[name] / m[BASE]:.2f}, {m[name] / m[ANCHOR]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--calibration", type=int, default=16, help="Random calibration samples.")
    args = parser.parse_args()
    info = rt.machine_info()
    flags = ", ".join(k for k, v in info["flags"].items() if v)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch ISA {info['torch_cpu_capability']}; flags: {flags}")
    print(f"OpenVINO CPU precisions: {', '.join(rt.openvino_precisions())}")
    torch.manual_seed(0)
    np.random.seed(0)
    example = torch.randn(1, 3, 224, 224)
    deployed = trainfer.deploy(randomize_batchnorm(repvgg_a0()).eval(), example)
    calibration = torch.randn(args.calibration, 3, 224, 224)
    with tempfile.TemporaryDirectory(prefix="int8-anchor-") as name:
        work = Path(name)
        files = {"float": work / "float.onnx"}
        export(deployed, files["float"], "onnx", example_inputs=example)
        for key, reduce_range, runtime in VARIANTS:
            files[key] = work / f"{key}.onnx"
            files[key].write_bytes(_trainfer_int8(deployed, calibration, reduce_range, runtime))
        nncf_files = _nncf_files(files["float"], calibration, work)
        files["nncf-ov"], files["nncf-onnx"] = nncf_files["ov"], nncf_files["onnx"]
        for threads, clock, title in (
            (args.threads, time.perf_counter, f"wall clock, {args.threads} threads"),
            (1, time.process_time, "process CPU time, 1 thread"),
        ):
            with num_threads(threads):
                forms = build(deployed, work, threads, files)
                medians = {b: interleaved(forms, torch.randn(b, 3, 224, 224), args.rounds, clock) for b in args.batches}
            report(title, medians)


if __name__ == "__main__":
    main()
