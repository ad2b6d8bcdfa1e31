"""Speed of ``explain_to_files`` (``trainfer predict --explain DIR``): this tree against a baseline revision.

The baseline's ``trainfer/analysis/attribution_files.py`` (``--baseline``, by default the revision before
chunks and the reused figure) is loaded from git beside this tree's, and three things are timed on
digits_net (random weights, seed 0) with random 8 x 8 inputs, the forms compared interleaved round by
round (so drifting machine load hits each alike), medians over the rounds:

* explaining: ``explain_batch`` on one example at a time (the baseline's loop) against chunks of 8,
  16 and 32 examples (``explain_each`` takes 16), integrated gradients at its defaults;
* drawing: the baseline's ``plot_attribution`` (a new pyplot figure per PNG) against one
  ``AttributionPlotter`` (one Agg figure redrawn per PNG), the same attributions, atomic writes;
* the whole run: the baseline's ``explain_to_files`` against this tree's, into empty directories.

Both clocks per example: this process's CPU time (``process_time``; at ``--threads 1`` the work done,
whatever else shares the cores) and wall time (``perf_counter``). The PNGs of both forms are compared
at the end (size, pixels that differ).

    .venv/bin/python benchmarks/bench_explain_files.py [--examples 32] [--rounds 5] [--threads 1]
        [--baseline 9f468d4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainfer.analysis import attribution_files
from trainfer.analysis.attribution_methods import explain_batch
from trainfer.analysis.attribution_plots import AttributionPlotter
from trainfer.models import digits_net
from trainfer.serve.predictor import Predictor
from trainfer.serve.preprocess import PreprocessSpec

CHUNKS = (8, 16, 32)


def baseline_module(revision: str) -> types.ModuleType:
    """``trainfer.analysis.attribution_files`` as it was at ``revision`` (its imports from this tree)."""
    path = "trainfer/analysis/attribution_files.py"
    source = subprocess.run(["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("baseline_attribution_files")
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def timed(run: Callable[[], object], count: int) -> tuple[float, float]:
    """CPU and wall seconds per item of one ``run()`` over ``count`` items."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


def interleaved(forms: dict[str, Callable[[], object]], count: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median CPU and wall seconds per item of each form, the forms run in turn each round (after a warm-up)."""
    for run in forms.values():
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, run in forms.items():
            samples[name].append(timed(run, count))
    return {name: tuple(statistics.median(s[k] for s in got) for k in (0, 1)) for name, got in samples.items()}


def table(title: str, results: dict[str, tuple[float, float]]) -> None:
    first = next(iter(results.values()))
    print(f"\n{title}\n| form | CPU ms/example | wall ms/example | CPU vs first |\n|---|---:|---:|---:|")
    for name, (cpu, wall) in results.items():
        print(f"| {name} | {cpu * 1e3:.1f} | {wall * 1e3:.1f} | {cpu / first[0]:.2f}x |")


def in_chunks(predictor: Predictor, batch: torch.Tensor, size: int) -> None:
    for start in range(0, len(batch), size):
        explain_batch(predictor, batch[start : start + size])


def compare_pngs(old: Path, new: Path) -> str:
    names = sorted(p.name for p in old.iterdir())
    differing, shapes = [], set()
    for name in names:
        a, b = (np.asarray(Image.open(d / name).convert("RGB")) for d in (old, new))
        shapes.add((a.shape, b.shape))
        differing.append(float((a != b).any(axis=2).mean()) if a.shape == b.shape else 1.0)
    return (
        f"{len(names)} PNGs, sizes (baseline, this tree) {sorted(shapes)}; pixels that differ: "
        f"median {statistics.median(differing):.2%}, most {max(differing):.2%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each form")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--baseline", default="9f468d4", help="git revision of the baseline explain_to_files")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels = [str(i) for i in range(10)]
    predictor = Predictor(digits_net().eval(), labels=labels, preprocess=PreprocessSpec(input_shape=(1, 8, 8)))
    batch = torch.rand(args.examples, 1, 8, 8)
    baseline = baseline_module(args.baseline)
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(f"digits_net, {args.examples} random 8 x 8 inputs, integrated gradients; {args.rounds} rounds")

    explaining = {"one at a time (baseline)": lambda: in_chunks(predictor, batch, 1)}
    explaining |= {f"chunks of {size}": (lambda size=size: in_chunks(predictor, batch, size)) for size in CHUNKS}
    table("explaining (explain_batch calls)", interleaved(explaining, args.examples, args.rounds))

    result = explain_batch(predictor, batch)
    plotter = AttributionPlotter(labels)
    with tempfile.TemporaryDirectory() as work:
        old, new = Path(work, "old"), Path(work, "new")

        def draw(plot: Callable[..., object], directory: Path) -> None:
            for i in range(args.examples):
                plot(result, i, directory / f"{i:03d}.png")

        drawing = {
            "new figure per PNG (baseline)": lambda: draw(lambda *a: baseline.plot_attribution(*a, labels=labels), old),
            "one figure redrawn": lambda: draw(plotter.draw, new),
        }
        table("drawing (one PNG each)", interleaved(drawing, args.examples, args.rounds))
        print(f"\nPNGs: {compare_pngs(old, new)}")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a model whose explanation fails for some inputs: timed all the same
            runs = {
                "baseline explain_to_files": lambda: run_files(baseline.explain_to_files, predictor, batch, old),
                "this tree's explain_to_files": lambda: run_files(
                    attribution_files.explain_to_files, predictor, batch, new
                ),
            }
            table("the whole run (explain_to_files)", interleaved(runs, args.examples, args.rounds))
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


def run_files(explain_to_files: Callable[..., object], predictor: Predictor, batch: torch.Tensor, out: Path) -> None:
    try:
        explain_to_files(predictor, batch, out)
    except attribution_files.ExplanationsIncomplete:
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
