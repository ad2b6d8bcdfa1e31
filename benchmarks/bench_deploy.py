"""What ``trainfer.deploy`` buys, measured in one run at 1x3x224x224 on 2 threads.

1. A user-written RepVGG-A0-shaped model (plain ``nn.Conv2d``/``nn.BatchNorm2d``/``+``, no
   trainfer imports) in four forms, timed interleaved (``trainfer.bench.time_forms``):
   the training form in ``eval()``, ``torch.fx.experimental.optimization.fuse`` (the best built-in
   peer: it folds a conv directly followed by a BatchNorm), ``trainfer.deploy``, and the plain
   ``Conv2d(bias) + ReLU`` chain of the same layers (the speed limit). Printed as ratios:
   ``deploy / plain`` (target <= 1.03) and ``fx fuse / deploy`` (the gap to the best peer).
2. trainfer's own ``repvgg_a0``: ``deploy`` against the model's ``reparameterize()`` and fx fuse.
3. Conversion time of ``deploy(repvgg_a0)`` (target < 2 s), without and with verification.

    .venv/bin/python benchmarks/bench_deploy.py [--rounds 30] [--repeats 1] [--threads 2] [--plot f.png]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.fx.experimental.optimization import fuse

import trainfer
from trainfer.atomic import atomic_file
from trainfer.bench import num_threads, time_forms
from trainfer.models import reparameterize, repvgg_a0
from trainfer.testing import assert_close, count_aten_ops, randomize_batchnorm

TARGET = 1.03
#: RepVGG-A0: blocks per stage and widths (64 * 0.75 for the first stages, 512 * 2.5 for the last).
STAGES = ((1, 48), (2, 48), (4, 96), (14, 192), (1, 1280))


class UserBlock(nn.Module):
    """RepVGG's training block as a user writes it: 3x3 conv-BN + 1x1 conv-BN + identity BN, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv3(x) + self.conv1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.relu(out)


def layer_shapes() -> list[tuple[int, int, int]]:
    """``(in, out, stride)`` of every block; the first block of each stage halves the resolution."""
    shapes, channels = [], 3
    for blocks, width in STAGES:
        for index in range(blocks):
            shapes.append((channels, width, 2 if index == 0 else 1))
            channels = width
    return shapes


def head(num_classes: int = 1000) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(STAGES[-1][1], num_classes)]


def user_model() -> nn.Sequential:
    blocks = [UserBlock(cin, cout, stride) for cin, cout, stride in layer_shapes()]
    return randomize_batchnorm(nn.Sequential(*blocks, *head())).eval()


def plain_model(deployed: torch.fx.GraphModule) -> nn.Sequential:
    """An ``nn.Sequential`` of the same ``Conv2d``/``ReLU``/head layers (same weights) deploy runs.

    Same weights, so that activations (and any data-dependent kernel speed) are the same too: the
    ratio measures only what the deployed form's structure costs.
    """
    layers = [node.target for node in deployed.graph.nodes if node.op == "call_module"]
    return nn.Sequential(*(copy.deepcopy(deployed.get_submodule(name)) for name in layers)).eval()


def report_ratios(timings: dict, numerator: str, denominator: str) -> float:
    return timings[numerator].median_s / timings[denominator].median_s


def conversion_seconds(model: nn.Module, x: torch.Tensor, verify: bool, runs: int) -> float:
    """Median wall time of ``deploy(model, x, verify=verify)`` over ``runs`` calls."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        trainfer.deploy(model, x, verify=verify)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def plot(groups: dict[str, dict], path: Path) -> None:
    figure = Figure(figsize=(9, 4))
    for axis, (title, timings) in zip(figure.subplots(1, len(groups)), groups.items(), strict=True):
        names = list(timings)
        axis.bar(names, [timings[n].median_s * 1e3 for n in names], color="tab:blue")
        axis.set_title(title)
        axis.set_ylabel("median latency (ms)")
        axis.tick_params(axis="x", rotation=20)
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds over the forms")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per form and round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--conversions", type=int, default=3, help="timed deploy(repvgg_a0) calls")
    parser.add_argument("--plot", default="runs/bench_deploy.png", help="write a PNG bar chart here")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)

    with num_threads(args.threads):
        user = user_model()
        deployed = trainfer.deploy(user, x)
        user_forms = {"train (eval)": user, "fx fuse": fuse(user), "deploy": deployed, "plain": plain_model(deployed)}
        assert_close(deployed(x), user(x))
        assert_close(user_forms["plain"](x), deployed(x))
        same_ops = count_aten_ops(deployed, x) == count_aten_ops(user_forms["plain"], x)
        ours = randomize_batchnorm(repvgg_a0()).eval()
        zoo_forms = {
            "fx fuse": fuse(ours),
            "reparameterize()": reparameterize(copy.deepcopy(ours)),
            "deploy": trainfer.deploy(ours, x, protocols=False),
        }
        without = conversion_seconds(ours, x, verify=False, runs=args.conversions)
        with_verification = conversion_seconds(ours, x, verify=True, runs=1)
    user_timings = time_forms(user_forms, x, rounds=args.rounds, repeats=args.repeats, threads=args.threads)
    zoo_timings = time_forms(zoo_forms, x, rounds=args.rounds, repeats=args.repeats, threads=args.threads)

    print(f"user-written RepVGG-A0, 1x3x{args.size}x{args.size}, {args.threads} threads (median ms):")
    for name, timing in user_timings.items():
        print(f"  {name:<18} {timing.median_s * 1e3:8.2f}")
    ratio = report_ratios(user_timings, "deploy", "plain")
    print(f"  deploy / plain Conv+ReLU = {ratio:.3f} ({'meets' if ratio <= TARGET else 'misses'} the {TARGET} target)")
    print(f"  fx fuse / deploy         = {report_ratios(user_timings, 'fx fuse', 'deploy'):.3f}")
    print(f"  deploy executes the same aten ops as the plain chain: {same_ops}")
    print(f"  train (eval) / deploy    = {report_ratios(user_timings, 'train (eval)', 'deploy'):.3f}")
    print("trainfer.models.repvgg_a0 (median ms):")
    for name, timing in zoo_timings.items():
        print(f"  {name:<18} {timing.median_s * 1e3:8.2f}")
    print(f"  deploy / reparameterize() = {report_ratios(zoo_timings, 'deploy', 'reparameterize()'):.3f}")
    print(f"  fx fuse / deploy          = {report_ratios(zoo_timings, 'fx fuse', 'deploy'):.3f}")
    print(f"conversion deploy(repvgg_a0): {without:.2f} s without verification, {with_verification:.2f} s with "
          f"(float64 and float32 checks); target < 2 s")  # fmt: skip
    plot({"user-written RepVGG-A0": user_timings, "trainfer repvgg_a0": zoo_timings}, Path(args.plot))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
