"""Cost of ``import trainfer`` over ``import torch`` (target: under 0.25 s).

Each round starts a fresh interpreter that times ``import torch`` and then ``import trainfer``
with ``time.perf_counter`` (so torch's own import, which dominates, is not counted); the figure is
the median over rounds, with the spread, and the heavy optional modules the import pulled in.

    .venv/bin/python benchmarks/bench_import.py [--rounds 15] [--module trainfer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
start = time.perf_counter(); import torch; torch_s = time.perf_counter() - start
start = time.perf_counter(); import {module}; module_s = time.perf_counter() - start
heavy = ("matplotlib", "onnx", "onnxruntime", "onnxscript", "captum", "sklearn", "PIL", "scipy", "pydantic")
print(json.dumps({{"torch_s": torch_s, "module_s": module_s, "heavy": [m for m in heavy if m in sys.modules]}}))
"""


def measure(module: str) -> dict:
    """One fresh interpreter's import times."""
    command = [sys.executable, "-c", PROBE.format(module=module)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="fresh interpreters to time (default 15)")
    parser.add_argument("--module", default="trainfer", help="module to import after torch (default trainfer)")
    args = parser.parse_args()
    runs = [measure(args.module) for _ in range(args.rounds)]
    costs = sorted(run["module_s"] for run in runs)
    torch_s = statistics.median(run["torch_s"] for run in runs)
    print(f"import torch: median {torch_s:.3f} s over {args.rounds} fresh interpreters")
    print(
        f"import {args.module} after torch: median {statistics.median(costs):.3f} s "
        f"(min {costs[0]:.3f}, max {costs[-1]:.3f}); heavy modules pulled in: {runs[0]['heavy'] or 'none'}"
    )


if __name__ == "__main__":
    main()
