"""Integrated gradients' cost against ``n_steps``: Captum's ``IntegratedGradients`` against trainfer's.

Captum's (what trainfer ran before ``trainfer.analysis.attribution_ig``: its default Gauss-Legendre rule,
the path in chunks of 8 rows, the convergence delta) takes the rule from NumPy's ``leggauss``, a dense
``n_steps x n_steps`` eigenproblem; trainfer's takes the same rule from SciPy's ``roots_legendre``
(its cache cleared before every call here, so the rule's cost is counted each time). Both explain one
random 8 x 8 input of digits_net (random weights, seed 0) for its predicted class, the two forms
interleaved round by round at each ``n_steps``; medians over the rounds of this process's CPU time
(``process_time``; at ``--threads 1`` the work done) and wall time.

    .venv/bin/python benchmarks/bench_ig_steps.py [--steps 400,800,1600,3200] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """CPU and wall seconds of one ``run()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="400,800,1600,3200", help="comma-separated n_steps values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # NumPy's eigensolver too, if not yet loaded

    import torch
    from captum.attr import IntegratedGradients

    from trainfer.analysis import attribution_ig
    from trainfer.analysis.attribution import attribute
    from trainfer.models import digits_net

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x = digits_net().eval(), torch.rand(1, 1, 8, 8)
    target = model(x).argmax(1)

    def captum(n_steps: int) -> object:
        return IntegratedGradients(model).attribute(
            x, target=target, n_steps=n_steps, internal_batch_size=8, return_convergence_delta=True
        )

    def trainfer(n_steps: int) -> object:
        attribution_ig.path_rule.cache_clear()
        return attribute(model, x, target=target, n_steps=n_steps)

    forms = {"Captum": captum, "trainfer": trainfer}
    for run in forms.values():
        run(8)  # warm-up
    print("| n_steps | Captum CPU s | trainfer CPU s | Captum wall s | trainfer wall s | CPU ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n_steps in (int(n) for n in args.steps.split(",")):
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, run in forms.items():
                samples[name].append(timed(lambda run=run, n=n_steps: run(n)))
        cpu, wall = ({n: statistics.median(s[k] for s in got) for n, got in samples.items()} for k in (0, 1))
        ratio = cpu["Captum"] / cpu["trainfer"]
        print(
            f"| {n_steps} | {cpu['Captum']:.2f} | {cpu['trainfer']:.2f} | {wall['Captum']:.2f} | "
            f"{wall['trainfer']:.2f} | {ratio:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
