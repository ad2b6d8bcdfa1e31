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


@pytest.mark.parametrize(
    ("script", "argv", "missing", "target"),
    [
        ("bench_timm", ["--rounds", "1", "--models", "resnet18"], "timm", "test-timm"),
        ("bench_interop", ["--rounds", "1", "--models", "resnet18,bert"], "torchvision, transformers", "test-interop"),
    ],
)
def test_an_interop_benchmark_without_its_libraries_says_what_is_missing_in_one_line(
    script, argv, missing, target, monkeypatch, capsys
):
    """Run with a Python that lacks them (the main venv): one line naming them and the make target, exit 2."""
    for library in ("timm", "torchvision", "transformers", "ultralytics"):
        monkeypatch.setitem(sys.modules, library, None)  # importlib.util.find_spec then finds nothing
    path = str(BENCHMARKS / f"{script}.py")
    monkeypatch.setattr(sys, "argv", [path, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path} needs {missing}, which ") and f"`make {target}` builds .venv-next" in line
