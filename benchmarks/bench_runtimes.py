"""Every runtime and precision of the same deploy weights, as latency relative to eager float32, in one run.

For each model (``repvgg_a0``, ``mobileone_s0``; random weights, non-trivial BatchNorm
statistics) at 224x224, batch 1 and 8, these forms of one deploy form are timed paired, call by
call (``trainfer.bench.time_forms``), and printed as ratios to eager float32:

* ``torch``, ``torch-channels-last`` (float32, bfloat16), ``onnxruntime``, ``openvino`` (float32)
  and ``inductor`` (with ``--inductor``: compiling costs minutes here), each built and verified by
  ``trainfer.compile`` (float32 within 1e-5 of float64, bfloat16 within 3e-2 and an open gate on
  the example: bf16 is compiled only behind a gate, and these figures are about speed);
* int8: the QDQ file of ``trainfer.quantize`` (per-channel weights; random calibration and an open
  gate, so only the speed of these int8 figures means anything) on ONNX Runtime and OpenVINO;
* the choice of ``trainfer.compile(runtime="auto")`` among the float32 runtimes, measured by its
  own paired run, and the ratio of the chosen form to the best float32 candidate of this run.

The machine line names the CPU flags that decide bf16/int8 speed (AVX-512 BF16/AMX, VNNI).

    .venv/bin/python benchmarks/bench_runtimes.py [--models repvgg_a0 mobileone_s0] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import trainfer
from trainfer.bench import num_threads, time_forms
from trainfer.models import FACTORIES
from trainfer.serve import runtime as rt
from trainfer.serve.gate import AccuracyGate
from trainfer.testing import randomize_batchnorm

#: The gate of the reduced precisions here: open (random inputs say nothing of accuracy), so that only speed is read.
OPEN_GATE = AccuracyGate(None, None, None)

FLOAT_FORMS = [
    ("torch", "float32"),
    ("torch-channels-last", "float32"),
    ("onnxruntime", "float32"),
    ("openvino", "float32"),
    ("torch", "bfloat16"),
    ("torch-channels-last", "bfloat16"),
    ("openvino", "bfloat16"),
]


def build_forms(deployed: torch.nn.Module, example: torch.Tensor, inductor: bool) -> tuple[dict, dict]:
    """``{name: callable}`` of every available verified form, and ``{name: reason}`` for those left out."""
    forms, skipped = {}, {}
    for runtime, dtype in FLOAT_FORMS + ([("inductor", "float32")] if inductor else []):
        name = f"{runtime}/{dtype}"
        try:
            gated = {} if dtype == "float32" else {"gate": OPEN_GATE, "gate_data": example}  # speed only
            forms[name] = trainfer.compile(deployed, example, runtime=runtime, dtype=dtype, **gated)
        except (trainfer.EquivalenceError, ImportError, ValueError) as error:
            skipped[name] = str(error).split(": ", 1)[-1][:110]
    calibration = torch.randn(16, *example.shape[1:])
    int8 = trainfer.quantize(
        deployed,
        calibration,
        gate=OPEN_GATE,
        equalize=False,
        max_float_layers=0,
        calibration_limit=16,
        sensitivity_samples=2,
    )
    forms["onnxruntime/int8"] = int8
    if rt.openvino_precisions():
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "int8.onnx"
            path.write_bytes(int8.onnx_bytes)
            forms["openvino/int8"] = rt.OpenVinoEngine(path, int8.manifest, torch.get_num_threads())
    else:
        skipped["openvino/int8"] = "openvino is not installed"
    return forms, skipped


def run(model_name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(FACTORIES[model_name]()).eval()
    example = torch.randn(1, 3, 224, 224)
    deployed = trainfer.deploy(model, example)
    forms, skipped = build_forms(deployed, example, args.inductor)
    print(f"\n## {model_name} (deploy form, 224x224, {torch.get_num_threads()} threads)")
    ratios: dict[str, dict[int, float]] = {name: {} for name in forms}
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        timings = time_forms(forms, x, rounds=args.rounds, repeats=1, warmup=2)
        base = timings["torch/float32"].median_s
        for name, timing in timings.items():
            ratios[name][batch] = timing.median_s / base
        print(f"batch {batch}: eager float32 median {1e3 * base:.1f} ms")
    print("| form of the same deploy weights | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---|" * len(args.batches))
    for name in sorted(forms, key=lambda n: ratios[n][args.batches[-1]]):
        print(f"| {name} | " + " | ".join(f"{ratios[name][b]:.2f}" for b in args.batches) + " |")
    for name, reason in skipped.items():
        print(f"| {name} | not available: {reason} |")
    auto = trainfer.compile(deployed, example, runtime="auto", batch_sizes=tuple(args.batches), rounds=args.rounds)
    chosen = f"{auto.record.runtime}/{auto.record.dtype}"
    float_forms = [c for c in auto.record.candidates if c.status == "ok"]
    best = min(float_forms, key=lambda c: c.score)
    print(
        f"auto choice: {chosen} (its own paired run: score {best.score:.2f} x eager float32; "
        f"chosen / best candidate = {next(c for c in float_forms if c.name == chosen).score / best.score:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["repvgg_a0", "mobileone_s0"], choices=sorted(FACTORIES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inductor", action="store_true", help="Also time torch.compile (minutes to compile).")
    args = parser.parse_args()
    with num_threads(args.threads):
        info = rt.machine_info()
        flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["flags"].items())
        print(f"machine: {info['cpu']}, {info['cores']} cores, torch ISA {info['torch_cpu_capability']}; {flags}")
        print(f"OpenVINO CPU precisions: {', '.join(rt.openvino_precisions()) or 'openvino not installed'}")
        for name in args.models:
            run(name, args)


if __name__ == "__main__":
    main()
