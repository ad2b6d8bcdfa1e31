"""Re-parameterization speed-up on repvgg_a0, and how close the folded blocks come to plain convs.

For batch 1 and batch 8 at 224x224 on 2 threads, the median latency of three forms, interleaved in
one run (``trainfer.bench.time_forms``) so that drifting machine load hits every form alike:

* train form in ``eval()`` (three branches and BatchNorm per block),
* reparameterized form (``trainfer.models.reparameterize``: one conv per block),
* plain: an ``nn.Sequential`` of the same ``Conv2d`` + ``ReLU`` layers (and head), the speed limit.

Printed as ratios: ``train / reparameterized`` (what folding saves) and ``reparameterized / plain``
(target <= 1.03: the block wrapper costs nothing).

    .venv/bin/python benchmarks/bench_blocks.py [--rounds 30] [--repeats 1] [--threads 2] [--json f] [--plot f.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trainfer.atomic import atomic_file
from trainfer.bench import benchmark
from trainfer.models import repvgg_a0
from trainfer.testing import randomize_batchnorm

TARGET = 1.03


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=8, help="the second batch size timed")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds over the forms")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per form and round")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", help="write every figure and timing sample here")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = randomize_batchnorm(repvgg_a0())
    report = benchmark(
        model,
        (1, 3, args.size, args.size),
        forms=("train", "reparameterized", "plain"),
        batch_size=args.batch,
        rounds=args.rounds,
        repeats=args.repeats,
        threads=args.threads,
        name="repvgg_a0",
    )
    print(report.table())
    for label, batched in ((f"1x3x{args.size}x{args.size}", False), (f"{args.batch}x3x{args.size}x{args.size}", True)):
        speedup = report.ratio("train", "reparameterized", batched)
        overhead = report.ratio("reparameterized", "plain", batched)
        verdict = "meets" if overhead <= TARGET else "misses"
        print(
            f"{label}: train / reparameterized = {speedup:.3f}; reparameterized / plain = {overhead:.3f} "
            f"({verdict} the {TARGET} target)"
        )
    if args.json:
        with atomic_file(Path(args.json)) as path:
            path.write_text(json.dumps(report.to_dict(), indent=2))
    if args.plot:
        with atomic_file(Path(args.plot)) as path:
            report.plot().savefig(path, format="png", dpi=120)


if __name__ == "__main__":
    main()
