"""Overhead of ``trainfer.guard`` on a repvgg_a0 forward pass (target: under 1 %).

Two figures from one run:

* measured: median forward time with the guard over median without, from interleaved rounds of
  ``trainfer.bench.time_forward`` (so drifting machine load hits both sides alike);
* hook cost: the guard's pre-hook timed alone over many calls, divided by the median forward time
  without the guard: the overhead free of the noise of timing whole forward passes.

    .venv/bin/python benchmarks/bench_guard.py [--size 224] [--rounds 60] [--repeats 1] [--plot guard.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

import trainfer
from trainfer.atomic import atomic_file
from trainfer.bench import time_forward
from trainfer.models import repvgg_a0
from trainfer.modes.guard import GuardHandle
from trainfer.testing import randomize_batchnorm


def hook_cost_s(handle: GuardHandle, model: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    """Seconds per call of the guard's pre-hook, under inference_mode like the timed forwards."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(calls):
            handle._check(model, (x,), {})
        return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved plain/guarded rounds")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per round and side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: unchanged)")
    parser.add_argument("--plot", help="write a PNG of the per-forward times here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = randomize_batchnorm(repvgg_a0()).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    plain: list[float] = []
    guarded: list[float] = []
    time_forward(model, x, warmup=3, repeats=1, threads=args.threads)
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        plain += time_forward(model, x, warmup=0, repeats=args.repeats, threads=args.threads).samples
        with trainfer.guard(model):
            guarded += time_forward(model, x, warmup=0, repeats=args.repeats, threads=args.threads).samples
    with trainfer.guard(model) as handle:
        per_hook = hook_cost_s(handle, model, x, calls=10_000)
        watched = len(handle.watched)

    plain_median, guarded_median = statistics.median(plain), statistics.median(guarded)
    print(f"repvgg_a0, input {tuple(x.shape)}, eval mode, inference_mode; guard watches {watched} modules")
    print(
        f"forward median: plain {plain_median * 1e3:.2f} ms, guarded {guarded_median * 1e3:.2f} ms "
        f"({len(plain)} forwards each)"
    )
    print(f"measured ratio guarded/plain: {guarded_median / plain_median:.4f}")
    print(f"hook cost: {per_hook * 1e6:.2f} us per forward = {100 * per_hook / plain_median:.4f} % of a forward")
    if args.plot:
        plot(plain, guarded, args.plot)


def plot(plain: list[float], guarded: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    axis.boxplot([[t * 1e3 for t in plain], [t * 1e3 for t in guarded]], tick_labels=["plain", "guarded"])
    axis.set_ylabel("forward time (ms)")
    axis.set_title("trainfer.guard overhead on repvgg_a0")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
