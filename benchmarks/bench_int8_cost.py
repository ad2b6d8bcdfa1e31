"""CPU time of the load-time checks of an int8 form, on ``repvgg_a0``'s (1000 classes, 1x3x224x224).

Every load of a bundle's int8 form parses ``quantized.onnx`` and checks its operators
(``trainfer.serve.int8_ops.check_int8_ops``), counts the float model's flops on the meta device
(``trainfer.serve.int8_cost.float_flops``) and costs the graph on the recorded input shape
(``trainfer.serve.int8_cost.check_int8_cost``). This quantizes a randomly initialised ``repvgg_a0``
once (about 10 s), then times each part and a whole ``Predictor.load``, at one torch thread: the
median of ``--rounds`` runs, CPU (``time.process_time``) and wall clock. ``--compare-with DIR`` also
times another checkout's ``check_int8_cost`` (its ``trainfer/serve/int8_cost.py``, importing this
checkout's other modules) on the same form, interleaved with this one's, alternating which goes first.

    .venv/bin/python benchmarks/bench_int8_cost.py [--rounds 5] [--compare-with DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import trainfer
from trainfer.models import repvgg_a0
from trainfer.serve.int8_cost import check_int8_cost, float_flops
from trainfer.serve.int8_ops import check_int8_ops

SHAPE = [1, 3, 224, 224]


def int8_bundle(directory: Path) -> Path:
    """``repvgg_a0``'s deploy form saved as a bundle, quantized (no gate: the timing, not the accuracy)."""
    torch.manual_seed(0)
    inputs = torch.randn(4, *SHAPE[1:])
    trainfer.save(trainfer.deploy(repvgg_a0().eval(), inputs[:2]), directory / "float", task="classification")
    gate = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few samples, no validation data: fine for timing
        quantized = trainfer.quantize(directory / "float", inputs, gate=gate, equalize=False, sensitivity_samples=2)
    return quantized.save(directory / "int8")


def timed(label: str, rounds: int, work: Callable[[], Any]) -> Any:
    cpu, wall, result = [], [], None
    for _ in range(rounds):
        started, clock = time.process_time(), time.perf_counter()
        result = work()
        cpu.append(time.process_time() - started)
        wall.append(time.perf_counter() - clock)
    print(f"{label:42s} cpu {1e3 * statistics.median(cpu):7.1f} ms   wall {1e3 * statistics.median(wall):7.1f} ms")
    return result


def interleaved(rounds: int, works: dict[str, Callable[[], Any]]) -> None:
    """Time each of ``works`` once a round, alternating the order; print each one's medians."""
    cpu: dict[str, list[float]] = {label: [] for label in works}
    wall: dict[str, list[float]] = {label: [] for label in works}
    for round_ in range(rounds):
        for label in list(works) if round_ % 2 == 0 else list(reversed(works)):
            started, clock = time.process_time(), time.perf_counter()
            works[label]()
            cpu[label].append(time.process_time() - started)
            wall[label].append(time.perf_counter() - clock)
    for label in works:
        median_cpu, median_wall = 1e3 * statistics.median(cpu[label]), 1e3 * statistics.median(wall[label])
        print(f"{label:42s} cpu {median_cpu:7.1f} ms   wall {median_wall:7.1f} ms   (interleaved)")


def other_check(checkout: Path) -> Callable[..., None]:
    """``check_int8_cost`` of the checkout at ``checkout``."""
    spec = importlib.util.spec_from_file_location("compared_int8_cost", checkout / "trainfer/serve/int8_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_int8_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-with", type=Path, metavar="DIR", help="another checkout's root")
    args = parser.parse_args()
    rounds = args.rounds
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        bundle = int8_bundle(Path(work))
        data = (bundle / "quantized.onnx").read_bytes()
        reference = trainfer.load(bundle)
        weights = sum(t.numel() for t in reference.state_dict().values())
        print(f"load average {os.getloadavg()[0]:.2f}; {len(data)} bytes")
        model = timed("parse and allow-list (check_int8_ops)", rounds, lambda: check_int8_ops(data, "q"))
        flops = timed("float model's flops (float_flops)", rounds, lambda: float_flops(reference, SHAPE))
        timed(
            "inference and bounds (check_int8_cost)", rounds, lambda: check_int8_cost(model, SHAPE, weights, flops, "q")
        )
        timed("whole Predictor.load", rounds, lambda: trainfer.Predictor.load(bundle))
        if args.compare_with is not None:
            compared = other_check(args.compare_with)
            interleaved(
                rounds,
                {
                    "check_int8_cost, this checkout": lambda: check_int8_cost(model, SHAPE, weights, flops, "q"),
                    "check_int8_cost, compared": lambda: compared(model, SHAPE, weights, flops, "q"),
                },
            )
        print(f"{len(model.graph.node)} nodes; the float model computes {flops:.3g} flops")


if __name__ == "__main__":
    main()
