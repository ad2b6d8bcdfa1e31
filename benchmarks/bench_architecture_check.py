"""CPU time of the load-time computation check of a recorded architecture, optionally against another checkout.

``trainfer.serve.computation_check.check_computation`` runs on forged graphs of 500 and 4096 nodes
(``MAX_NODES``) on a 1x1x8x8 input: a ``conv`` followed by a chain of ``relu`` ("relu chain"), a conv
followed by a cycle of node kinds ("mix": ``torch.relu``, ``operator.add``, ``operator.mul``, the
``sigmoid`` method, ``F.softmax``, a 4->4 ``conv`` module, ``mean`` + broadcast ``add``), and a conv
followed by ``F.hardtanh(h, -1.0, 2.0)`` (4096 nodes; its Python meta kernel is among the costliest). Each
round runs one fresh interpreter per source tree (interleaved, so machine load hits both alike) at
one torch thread; it times each check with ``time.process_time`` after one warm-up check. With
``--against TREE`` (say an older checkout) it prints, per graph, the median ratio TREE / this tree
with a 95 % bootstrap interval.

    .venv/bin/python benchmarks/bench_architecture_check.py [--rounds 5] [--against /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from trainfer.bench.intervals import median_interval

HERE = str(Path(__file__).resolve().parent.parent)
GRAPHS = [("relu chain", 500), ("relu chain", 4096), ("mix", 500), ("mix", 4096), ("hardtanh chain", 4096)]
PROBE = """
import json, operator, sys, time
import torch
from torch import fx, nn
from torch.nn import functional as F
from trainfer.serve.computation_check import check_computation

torch.set_num_threads(1)


def graph(kind, nodes):
    root = nn.Module()
    root.conv, root.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    g = fx.Graph()
    h = g.call_module("conv", (g.placeholder("x"),))
    steps = [
        lambda h: g.call_function(torch.relu, (h,)),
        lambda h: g.call_function(operator.add, (h, 1.0)),
        lambda h: g.call_function(operator.mul, (h, h)),
        lambda h: g.call_method("sigmoid", (h,)),
        lambda h: g.call_function(F.softmax, (h,), {"dim": 1}),
        lambda h: g.call_module("conv2", (h,)),
        lambda h: g.call_function(operator.add, (h, g.call_method("mean", (h, 1), {"keepdim": True}))),
    ]
    chains = {"relu chain": steps[0], "hardtanh chain": lambda h: g.call_function(F.hardtanh, (h, -1.0, 2.0))}
    while len(g.nodes) < nodes - 2:  # a step adds one or two nodes
        h = chains[kind](h) if kind in chains else steps[len(g.nodes) % len(steps)](h)
    while len(g.nodes) < nodes - 1:
        h = steps[0](h)
    g.output(h)
    return fx.GraphModule(root, g)


graphs = [(kind, nodes, graph(kind, nodes)) for kind, nodes in json.loads(sys.argv[1])]
check_computation(graphs[0][2], [1, 1, 8, 8], "warm-up")
seconds = []
for kind, nodes, gm in graphs:
    start = time.process_time()
    check_computation(gm, [1, 1, 8, 8], "bench")
    seconds.append(time.process_time() - start)
print(json.dumps([[kind, len(gm.graph.nodes), s] for (kind, _, gm), s in zip(graphs, seconds)]))
"""


def cpu_seconds(tree: str) -> list[tuple[str, int, float]]:
    """CPU seconds of one check per graph of :data:`GRAPHS`, in a fresh interpreter with ``tree`` first on the path."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", PROBE, json.dumps(GRAPHS)]
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return [tuple(row) for row in json.loads(done.stdout.splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters per tree (default 5)")
    parser.add_argument("--against", help="another source tree to time in the same rounds (e.g. an old checkout)")
    args = parser.parse_args()
    trees = {"this tree": HERE, **({"against": args.against} if args.against else {})}
    samples: dict[str, dict[tuple[str, int], list[float]]] = {name: {} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for kind, nodes, seconds in cpu_seconds(tree):
                samples[name].setdefault((kind, nodes), []).append(seconds)
    print(f"load: {os.getloadavg()[0]:.2f} (1-minute average at the end), {args.rounds} rounds")
    for graph in samples["this tree"]:
        line = []
        for name in trees:
            values = samples[name][graph]
            line.append(f"{name} median {statistics.median(values):.2f} s CPU (min {min(values):.2f})")
        if args.against:
            ratios = [
                old / new for old, new in zip(samples["against"][graph], samples["this tree"][graph], strict=True)
            ]
            low, high = median_interval(ratios)
            line.append(f"ratio {statistics.median(ratios):.1f} (95 % interval {low:.1f} to {high:.1f})")
        print(f"{graph[0]}, {graph[1]} nodes: " + "; ".join(line))


if __name__ == "__main__":
    main()
