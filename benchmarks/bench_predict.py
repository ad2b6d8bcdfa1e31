"""Predictor overhead: ``Predictor.predict`` against a bare ``model(x)`` loop on the same batches.

Both run the same eval-mode model on the same ``(batch, 3, size, size)`` float32 batch, interleaved
(:func:`trainfer.bench.time_forms`, under ``torch.inference_mode``), so the ratio of their medians
is measured in one run. The predictor does everything it does in serving: validation (shape,
dtype, finiteness), the :func:`trainfer.inference` context, output-kind scores, typed results and
timings. Its spec has no normalisation, since the bare loop gets the same, already-normalised batch.

    .venv/bin/python benchmarks/bench_predict.py [--model repvgg_a0] [--batch-size 64] [--size 224]
        [--rounds 3] [--repeats 2] [--threads 2] [--plot runs/bench_predict.png]

Target (issue 5): overhead below 3 % at batch 64 for repvgg_a0. On a busy machine the ratio of
medians moves by more than that from background load alone: the ratio of the fastest calls and
the predictor's own stage timings (time outside the forward pass over time inside it) are printed
beside it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from trainfer import Predictor, models
from trainfer.bench import time_forms
from trainfer.serve.predictor import pick_device
from trainfer.testing import randomize_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="repvgg_a0", help="a factory in trainfer.models")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, ...")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    args = parser.parse_args()

    device = pick_device(args.device)
    model = randomize_batchnorm(getattr(models, args.model)()).eval().to(device)
    batch = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    spec = {"input_shape": (3, args.size, args.size)}
    predictor = Predictor(model, preprocess=spec, batch_size=args.batch_size, device=device)
    forms = {"bare model(x)": model, "Predictor.predict": predictor.predict}
    with tqdm(total=args.rounds * len(forms), desc="timing", unit="turn") as bar:
        timings = time_forms(
            forms, batch, rounds=args.rounds, repeats=args.repeats, warmup=1, threads=args.threads, progress=bar.update
        )
    bare, served = timings["bare model(x)"].median_s, timings["Predictor.predict"].median_s
    stages = predictor.timings
    print(
        f"{args.model}, batch {args.batch_size}x3x{args.size}x{args.size}, {args.threads} threads, "
        f"{args.rounds}x{args.repeats} interleaved calls each"
    )
    print(f"  bare model(x)      median {bare * 1e3:9.1f} ms  p90 {timings['bare model(x)'].p90_s * 1e3:9.1f} ms")
    print(f"  Predictor.predict  median {served * 1e3:9.1f} ms  p90 {timings['Predictor.predict'].p90_s * 1e3:9.1f} ms")
    print(
        f"  predictor stages per batch: preprocess {stages.preprocess / stages.batches * 1e3:.2f} ms, "
        f"forward {stages.forward / stages.batches * 1e3:.1f} ms, "
        f"postprocess {stages.postprocess / stages.batches * 1e3:.2f} ms"
    )
    fastest = min(timings["Predictor.predict"].samples) / min(timings["bare model(x)"].samples)
    around = statistics.median(b["preprocess"] + b["postprocess"] for b in stages.history) / statistics.median(
        b["forward"] for b in stages.history
    )
    print(
        f"  overhead ratio Predictor / bare = {served / bare:.4f} (medians), {fastest:.4f} (fastest calls); "
        "target < 1.03"
    )
    print(f"  work outside the forward pass (preprocess + postprocess) / forward = {around:.4%} (per-batch medians)")
    if args.plot is not None:
        plot(args, timings, stages, args.plot)
        print(f"  plot: {args.plot}")


def plot(args: argparse.Namespace, timings: dict, stages, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(timings)
    left.bar(names, [timings[n].median_s * 1e3 for n in names], color=["#888888", "#3b75af"])
    left.set_ylabel("median ms per batch")
    left.set_title(f"{args.model}, batch {args.batch_size}")
    parts = {"preprocess": stages.preprocess, "forward": stages.forward, "postprocess": stages.postprocess}
    right.bar(list(parts), [v / stages.batches * 1e3 for v in parts.values()], color="#3b75af")
    right.set_yscale("log")
    right.set_ylabel("ms per batch (log)")
    right.set_title("Predictor stages")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
