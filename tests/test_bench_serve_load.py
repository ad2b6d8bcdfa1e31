"""The target arithmetic and verdicts of ``benchmarks/bench_serve_load.py`` (``benchmarks/serve_targets.py``),
on hand-made rows: no server, no wrk."""

import importlib.util
import sys
from pathlib import Path

import pytest


def _load():
    path = Path(__file__).parent.parent / "benchmarks" / "serve_targets.py"
    spec = importlib.util.spec_from_file_location("serve_targets", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_targets"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


targets = _load()


def row(server, concurrency, rps, p50_ms=1.0, p99_ms=2.0, model="m", **extra):
    figures = {"rps": rps, "p50_ms": p50_ms, "p99_ms": p99_ms, **extra}
    return {"model": model, "server": server, "concurrency": concurrency, **figures}


def run(dynamic_32_rps=1000.0, dynamic_32_p99=9.0, overhead=0.10, forward_ms=2.0, floor_rps=2000.0, floor_model=0.3):
    """A run of one model: p50 1 ms at c=1 (p99 target 3 x 1 + 5 = 8 ms), batch-1 at 400 req/s at c=32."""
    return [
        row(targets.DYNAMIC, 1, 500.0, p50_ms=1.0, overhead=overhead, forward_ms=forward_ms),
        row(targets.DYNAMIC, 32, dynamic_32_rps, p99_ms=dynamic_32_p99),
        row(targets.BATCH_1, 32, 400.0),
        row(targets.FLOOR, 1, floor_rps),
        row(targets.FLOOR_MODEL, 1, 700.0, overhead=floor_model, forward_ms=1.0),
        row(targets.DYNAMIC, 32, 1.0, model="other"),  # another model's row is never read
    ]


def outcomes(rows):
    return [verdict.met for verdict in targets.verdicts(rows, "m")]


def test_the_target_arithmetic():
    assert targets.p99_target_ms(1.7) == pytest.approx(3 * 1.7 + 5)
    assert targets.p99_target_ms(2.0, delay_ms=0.0) == 6.0
    assert targets.floor_overhead(0.4, 0.8) == pytest.approx(1 / 3)


def test_verdicts_judge_each_target_from_the_rows():
    # batching 2.5x, p99 9 > 8 ms, overhead 10 %, floor 0.5 ms / (0.5 + 2) = 20 %, the floor with the model 30 %
    assert outcomes(run()) == [True, False, True, False, False]
    # batching 1.75x, p99 7.9 < 8 ms, overhead 15 % (not under), floor 0.1 / (0.1 + 2) = 4.8 %, with the model 5 %
    assert outcomes(
        run(dynamic_32_rps=700.0, dynamic_32_p99=7.9, overhead=0.15, floor_rps=10000.0, floor_model=0.05)
    ) == [False, True, False, True, True]
    assert targets.batching(run(dynamic_32_rps=800.0), "m").met  # exactly 2x meets ">= 2x"


def test_verdicts_state_their_figures():
    batching, tail, overhead, floor, floor_model = map(str, targets.verdicts(run(), "m"))
    assert batching == "batching gain at c=32 2.50x (1000.0 / 400.0 req/s) (target >= 2x): met"
    assert tail == "dynamic p99 at c=32 9.0 ms (target < 3 x 1.00 + 5 = 8.0 ms): NOT met"
    assert overhead == "dynamic overhead at c=1 10.0% (2.00 ms forward) (target < 15%): met"
    assert floor_model == (
        "(not a target) overhead of the floor running the model 30.0% (1.00 ms forward) (target < 15%): "
        "out of reach even at the floor"
    )
    assert floor == (
        "(not a target) overhead at the floor 20.0% (0.50 ms floor + 2.00 ms forward) (target < 15%): "
        "out of reach even at the floor"
    )


def test_a_missing_or_silent_row_is_not_measured_never_a_pass():
    rows = run()
    assert outcomes([r for r in rows if r["server"] != targets.FLOOR]) == [True, False, True, None, False]
    assert outcomes([r for r in rows if r["server"] != targets.BATCH_1]) == [None, False, True, False, False]
    assert outcomes([r for r in rows if r["server"] != targets.FLOOR_MODEL]) == [True, False, True, False, None]
    without_overhead = [{k: v for k, v in r.items() if k not in ("overhead", "forward_ms")} for r in rows]
    assert outcomes(without_overhead) == [True, False, None, None, None]  # --workers > 1
    floor_text = str(targets.floor(without_overhead, "m"))
    assert floor_text.startswith("(not a target) overhead at the floor - (0.50 ms floor, forward not")
    silent = [r | {"rps": 0.0} if r["server"] == targets.BATCH_1 else r for r in rows]
    assert outcomes(silent)[0] is None  # no division by zero, no infinite gain
    assert outcomes([]) == [None] * 5


def test_the_compiled_server_is_judged_against_its_own_single_request_latency():
    compiled = [
        row(targets.COMPILED, 1, 900.0, p50_ms=0.5, overhead=0.4, forward_ms=0.2),
        row(targets.COMPILED, 32, 3000.0, p99_ms=6.4),  # under 3 x 0.5 + 5 = 6.5 ms; the dynamic one's would be 8
    ]
    assert outcomes(run()) == [True, False, True, False, False]  # no compiled rows: no compiled verdicts
    tail, overhead = map(str, targets.verdicts(run() + compiled, "m")[5:])
    assert tail == "--compile p99 at c=32 6.4 ms (target < 3 x 0.50 + 5 = 6.5 ms): met"
    assert overhead == "--compile overhead at c=1 40.0% (0.20 ms forward) (target < 15%): NOT met"
    slower = [r | {"p99_ms": 6.6} if r["concurrency"] == 32 else r for r in compiled]
    assert outcomes(run() + slower)[5:] == [False, False]
