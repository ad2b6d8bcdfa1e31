"""The sampling methods' cost against how many perturbed copies share a forward (``perturbations_per_eval``).

Occlusion, Kernel SHAP and LIME run the model on perturbed copies of each example; Captum's default
runs one copy per forward, trainfer's default up to 64
(:func:`trainfer.analysis.attribution_shap.perturbations_at_once`). Each method explains one random
8 x 8 input of digits_net (random weights, seed 0) with ``n_samples`` coalitions (Kernel SHAP, LIME;
occlusion takes its 64 windows), the settings interleaved round by round; medians over the rounds of
this process's CPU time (``process_time``; at ``--threads 1`` the work done) and wall time.

    .venv/bin/python benchmarks/bench_perturbations.py [--samples 200,2000] [--per-eval 1,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="200,2000", help="comma-separated n_samples (Kernel SHAP, LIME)")
    parser.add_argument("--per-eval", default="1,64", help="comma-separated perturbations_per_eval values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from trainfer.analysis.attribution import attribute
    from trainfer.models import digits_net

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = digits_net().eval()
    x = torch.rand(1, 1, 8, 8)
    runs = [("occlusion", None)] + [(m, int(n)) for n in args.samples.split(",") for m in ("kernel_shap", "lime")]
    per_eval = [int(p) for p in args.per_eval.split(",")]
    print(f"median of {args.rounds} rounds, seconds (CPU / wall), {args.threads} thread(s)")
    print("| method | n_samples | " + " | ".join(f"per eval {p}" for p in per_eval) + " |")
    print("|---|---|" + "---|" * len(per_eval))
    for method, samples in runs:
        budget = {} if samples is None else {"n_samples": samples}
        times: dict[int, list[tuple[float, float]]] = {p: [] for p in per_eval}
        for _ in range(args.rounds):
            for p in per_eval:
                cpu, wall = time.process_time(), time.perf_counter()
                attribute(model, x, method, perturbations_per_eval=p, show_progress=False, **budget)
                times[p].append((time.process_time() - cpu, time.perf_counter() - wall))
        cells = [
            f"{statistics.median(c for c, _ in times[p]):.3f} / {statistics.median(w for _, w in times[p]):.3f}"
            for p in per_eval
        ]
        print(f"| {method} | {samples or '-'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
