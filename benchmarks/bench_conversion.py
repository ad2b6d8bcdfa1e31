"""What a conversion costs: ``trainfer.deploy`` with its proof of equivalence, stage by stage.

Two models, both at 1x3x224x224:

1. trainfer's ``repvgg_a0`` (target: < 2 s with verification);
2. ``large_kernel_net()``: a RepLKNet-style network written as a user would (plain ``nn.Conv2d``/
   ``nn.BatchNorm2d``, no trainfer imports): 24 blocks whose depthwise 31x31 conv-BN has a
   parallel 5x5 conv-BN branch (target: < 60 s with verification).

For each: deploy without verification, with verification on the example input, and with
verification on a smaller input (``verify_inputs``, 64x64; see docs/deploy-protocols.md for what a
smaller input proves). One run, wall-clock medians of ``--runs`` calls; ``--profile`` prints the
cProfile entries that take the most time in the verified conversion.

    python benchmarks/bench_conversion.py [--runs 1] [--threads 2] [--profile] [--models repvgg_a0,large_kernel]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import trainfer
from trainfer.bench import num_threads
from trainfer.models import repvgg_a0
from trainfer.testing import batch_norm_calls, count_aten_ops, randomize_batchnorm

TARGETS = {"repvgg_a0": 2.0, "large_kernel": 60.0}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class LargeKernelConv(nn.Module):
    """RepLKNet's ``ReparamLargeKernelConv``: depthwise KxK conv-BN + depthwise 5x5 conv-BN, summed."""

    def __init__(self, channels: int, kernel: int = 31, small: int = 5):
        super().__init__()
        self.lkb_origin = conv_bn(channels, channels, kernel, groups=channels)
        self.small_conv = conv_bn(channels, channels, small, groups=channels)

    def forward(self, x):
        return self.lkb_origin(x) + self.small_conv(x)


class LargeKernelBlock(nn.Module):
    """BN -> 1x1 conv-BN-ReLU -> large-kernel depthwise -> ReLU -> 1x1 conv-BN, plus the shortcut."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(channels)
        self.pw1 = nn.Sequential(conv_bn(channels, channels, 1), nn.ReLU())
        self.large_kernel = LargeKernelConv(channels, kernel)
        self.lk_nonlinear = nn.ReLU()
        self.pw2 = conv_bn(channels, channels, 1)

    def forward(self, x):
        out = self.pw1(self.prelkb_bn(x))
        return x + self.pw2(self.lk_nonlinear(self.large_kernel(out)))


def large_kernel_net(
    widths: tuple[int, ...] = (32, 64, 128, 256), depths: tuple[int, ...] = (2, 2, 18, 2), kernel: int = 31
) -> nn.Sequential:
    """A RepLKNet-31-shaped network (narrower): stem /4, four stages, transitions /2, pooled linear head."""
    layers: list[nn.Module] = [
        nn.Sequential(conv_bn(3, widths[0], 3, 2), nn.ReLU()),
        nn.Sequential(conv_bn(widths[0], widths[0], 3, 2, groups=widths[0]), nn.ReLU()),
    ]
    for index, (width, depth) in enumerate(zip(widths, depths)):
        layers += [LargeKernelBlock(width, kernel) for _ in range(depth)]
        if index + 1 < len(widths):
            following = widths[index + 1]
            layers += [
                nn.Sequential(conv_bn(width, following, 1), nn.ReLU()),
                nn.Sequential(conv_bn(following, following, 3, 2, groups=following), nn.ReLU()),
            ]
    layers += [nn.BatchNorm2d(widths[-1]), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 1000)]
    return nn.Sequential(*layers)


def median_seconds(function: Callable[[], Any], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, model: nn.Module, x: torch.Tensor, small: torch.Tensor, runs: int, profile: bool) -> None:
    variants = {
        "no verification": lambda: trainfer.deploy(model, x, verify=False),
        "verified at 224x224": lambda: trainfer.deploy(model, x),
        f"verified at {small.shape[-2]}x{small.shape[-1]}": lambda: trainfer.deploy(model, x, verify_inputs=small),
    }
    seconds = {label: median_seconds(function, runs) for label, function in variants.items()}
    deployed = trainfer.deploy(model, x, verify_inputs=small)
    before, after = count_aten_ops(model, x), count_aten_ops(deployed, x)
    print(
        f"{name}: convolutions {before['convolution']} -> {after['convolution']}, "
        f"BatchNorm kernels {batch_norm_calls(model, x)} -> {batch_norm_calls(deployed, x)}"
    )
    for label, value in seconds.items():
        print(f"  {label:<22} {value:7.2f} s")
    target = TARGETS[name]
    best = min(v for k, v in seconds.items() if k.startswith("verified"))
    print(f"  target < {target:.0f} s with verification: {'met' if best < target else 'MISSED'} ({best:.2f} s)")
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(trainfer.deploy, model, x)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="timed calls per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--small", type=int, default=64, help="spatial size of the smaller verification input")
    parser.add_argument("--profile", action="store_true", help="print the top cProfile entries")
    parser.add_argument("--models", default="repvgg_a0,large_kernel", help="comma-separated: repvgg_a0, large_kernel")
    args = parser.parse_args()
    builders = {"repvgg_a0": lambda: repvgg_a0(num_classes=1000), "large_kernel": large_kernel_net}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    small = torch.randn(1, 3, args.small, args.small, generator=torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, {args.threads} threads, input 1x3x224x224")
    with num_threads(args.threads):
        for name in args.models.split(","):
            model = randomize_batchnorm(builders[name]()).eval()
            measure(name, model, x, small, args.runs, args.profile)


if __name__ == "__main__":
    main()
