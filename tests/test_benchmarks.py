"""Every benchmark script imports and parses its arguments (they run outside the suite, so keep them alive)."""

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SCRIPTS = sorted([*BENCHMARKS.glob("bench_*.py"), BENCHMARKS / "fold_coverage.py"])


def test_benchmarks_exist():
    assert {p.stem for p in SCRIPTS} >= {"bench_blocks", "bench_deploy", "bench_guard", "bench_predict"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_help_runs(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_interop_bootstrap_interval_brackets_the_median_reproducibly():
    from interop import bench  # benchmarks/bench_interop.py (plain torch: no interop library is imported)

    ratios = [1.0 + 0.01 * i for i in range(41)]  # median 1.2
    spread = bench.Spread.bootstrap(ratios)
    assert spread.median == 1.2 and 1.1 < spread.low < 1.2 < spread.high < 1.3, spread
    assert bench.Spread.bootstrap(ratios) == spread  # seeded
    assert bench.Spread.bootstrap([1.05] * 9) == bench.Spread(1.05, 1.05, 1.05)
    assert bench.Spread.bootstrap([]).median != bench.Spread.bootstrap([]).median  # nan: nothing timed
