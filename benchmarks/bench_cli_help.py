"""CPU time of ``python -m trainfer --help`` (and whether it imported torch), optionally against another checkout.

Each round runs a fresh interpreter per source tree (interleaved, so machine load hits both alike)
at one thread and reads its user+system CPU time from ``resource.getrusage(RUSAGE_CHILDREN)``. With
``--against TREE`` (say an older checkout), it prints the median ratio TREE / this tree with a
95 % bootstrap interval.

    .venv/bin/python benchmarks/bench_cli_help.py [--rounds 10] [--against /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from trainfer.bench.intervals import median_interval

HERE = str(Path(__file__).resolve().parent.parent)
PROBE = (
    "import sys, runpy; sys.argv = ['trainfer', '--help']\ntry: runpy.run_module('trainfer', run_name='__main__')\n"
    "except SystemExit: pass\nprint('torch' in sys.modules, file=sys.stderr)"
)


def cpu_seconds(tree: str) -> tuple[float, bool]:
    """CPU seconds of one ``trainfer --help`` with ``tree`` first on the path, and whether it imported torch."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-c", PROBE]  # run in ``tree``: ``-c`` puts the working directory first on the path
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, done.stderr.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="fresh interpreters per tree (default 10)")
    parser.add_argument("--against", help="another source tree to time in the same rounds (e.g. an old checkout)")
    args = parser.parse_args()
    trees = {"this tree": HERE, **({"against": args.against} if args.against else {})}
    samples: dict[str, list[float]] = {name: [] for name in trees}
    torch_loaded: dict[str, bool] = {}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            seconds, torch_loaded[name] = cpu_seconds(tree)
            samples[name].append(seconds)
    for name, values in samples.items():
        print(
            f"{name}: trainfer --help median {statistics.median(values):.3f} s CPU (min {min(values):.3f}, "
            f"max {max(values):.3f}) over {args.rounds} interpreters; imported torch: {torch_loaded[name]}"
        )
    if args.against:
        ratios = [old / new for old, new in zip(samples["against"], samples["this tree"], strict=True)]
        low, high = median_interval(ratios)
        print(
            f"against / this tree: median ratio {statistics.median(ratios):.1f} (95 % interval {low:.1f} to {high:.1f})"
        )


if __name__ == "__main__":
    main()
