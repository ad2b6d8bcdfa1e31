"""Latencies measured by a starved or oversubscribed process are flagged, never trusted silently.

Clocks, CPU time, load and cores are injected: no real timing is asserted.
"""

from __future__ import annotations

import itertools

from trainfer.bench.conditions import Conditions, measured, untrusted
from trainfer.bench.measure import Timing
from trainfer.serve import runtime as rt
from trainfer.serve.runtime_record import CandidateRecord, RuntimeRecord

STEADY = {"torch/float32": Timing.from_samples([1.0, 1.1, 0.9, 1.0]), "onnxruntime/float32": Timing.from_samples([0.5])}


def sources(wall_s: float, cpu_s: float, load: float = 0.5, cores: int = 2) -> dict:
    """Clocks that advance by ``wall_s`` and ``cpu_s`` across one measured run."""
    wall, cpu = itertools.count(0.0, wall_s), itertools.count(0.0, cpu_s)
    return {"clock": lambda: next(wall), "cpu_clock": lambda: next(cpu), "load": lambda: load, "cores": lambda: cores}


def test_measured_reports_the_wall_and_cpu_time_of_the_run_and_its_result():
    result, conditions = measured(lambda: 7, 2, **sources(3.0, 5.5, load=1.25, cores=4))
    assert result == 7 and conditions == Conditions(3.0, 5.5, 2, 1.25, 4)


def test_an_idle_machine_gives_no_warning():
    assert untrusted(Conditions(2.0, 3.8, 2, 0.7, 2), STEADY) is None


def test_a_starved_process_is_flagged_with_its_cpu_share():
    warning = untrusted(Conditions(2.0, 0.1, 2, 0.7, 2), STEADY)
    assert warning is not None and "got 0.05 CPU-s per s while timing (2 threads asked)" in warning


def test_a_load_above_the_cores_is_flagged():
    warning = untrusted(Conditions(2.0, 3.8, 2, 5.5, 2), STEADY)
    assert warning is not None and "load average 5.5 above the 2 usable cores" in warning


def test_a_huge_spread_is_flagged_naming_the_form():
    timings = {**STEADY, "torch/float32": Timing.from_samples([1.0] * 8 + [60.0, 80.0])}
    warning = untrusted(Conditions(2.0, 3.8, 2, 0.7, 2), timings)
    assert warning is not None and "torch/float32's 90th-percentile call took 60.0x its median" in warning


def test_the_search_records_the_warning_and_the_table_says_it_on_one_line():
    engines = {"torch/float32": lambda x: x, "onnxruntime/float32": lambda x: x}
    records = {name: CandidateRecord(*name.split("/"), "ok") for name in engines}
    source = type("Source", (), {"sample_shape": (1, 2, 2)})()
    warnings: list[str] = []
    options = {"batch_sizes": [1, 8], "rounds": 2, "threads": 2, "warnings": warnings, "sources": sources(1.0, 0.02)}
    rt._measure(engines, records, source, options)
    assert len(warnings) == 1 and warnings[0].startswith("batch 1: latencies measured on a starved or busy machine")
    record = RuntimeRecord("torch", "float32", "auto", [1, 8], list(records.values()), {}, {}, {}, warnings)
    lines = [line for line in record.table().splitlines() if line.startswith("warning: ")]
    assert lines == [f"warning: {warnings[0]}"]
    assert RuntimeRecord.from_dict(record.to_dict()) == record
    quiet = {**options, "warnings": [], "sources": sources(1.0, 1.9)}
    rt._measure(engines, records, source, quiet)
    assert quiet["warnings"] == []
