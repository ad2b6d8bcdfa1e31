"""Every benchmark script imports and parses its arguments (they run outside the suite, so keep them alive)."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("bench_*.py"))


def test_benchmarks_exist():
    assert {p.stem for p in SCRIPTS} >= {"bench_blocks", "bench_deploy", "bench_guard", "bench_predict"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_help_runs(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
