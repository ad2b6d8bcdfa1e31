"""Latencies measured by a starved or oversubscribed process are flagged, never trusted silently.

Clocks, CPU time, load and cores are injected: no real timing is asserted.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from trainfer.bench.conditions import Conditions, measured, untrusted
from trainfer.bench.measure import Timing
from trainfer.errors import BundleError
from trainfer.serve import runtime as rt
from trainfer.serve.gated import choice_note
from trainfer.serve.runtime_record import MAX_WARNINGS, CandidateRecord, RuntimeRecord, choose

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


def test_the_search_records_a_warning_per_flagged_batch_size_and_the_table_says_each_on_one_line():
    engines = {"torch/float32": lambda x: x, "onnxruntime/float32": lambda x: x}
    records = {name: CandidateRecord(*name.split("/"), "ok") for name in engines}
    source = type("Source", (), {"sample_shape": (1, 2, 2)})()
    warnings: list[str] = []
    options = {"batch_sizes": [1, 8], "rounds": 2, "threads": 2, "warnings": warnings, "sources": sources(1.0, 0.02)}
    rt._measure(engines, records, source, options)
    assert [w.split(": latencies measured on a starved or busy machine")[0] for w in warnings] == ["batch 1", "batch 8"]
    record = RuntimeRecord("torch", "float32", "auto", [1, 8], list(records.values()), {}, {}, {}, warnings)
    lines = [line for line in record.table().splitlines() if line.startswith("warning: ")]
    assert lines == [f"warning: {warning}" for warning in warnings]
    assert RuntimeRecord.from_dict(record.to_dict()) == record
    quiet = {**options, "warnings": [], "sources": sources(1.0, 1.9)}
    rt._measure(engines, records, source, quiet)
    assert quiet["warnings"] == []


def test_the_advice_offers_one_thread_only_to_a_run_that_used_more():
    busy_at_two, busy_at_one = Conditions(2.0, 3.8, 2, 5.5, 2), Conditions(2.0, 1.9, 1, 5.5, 2)
    assert "--threads 1" in untrusted(busy_at_two, STEADY)
    assert untrusted(busy_at_one, STEADY).endswith("(rerun on an idle machine)")


def _measured(name: str, *ratios: float) -> CandidateRecord:
    return CandidateRecord(*name.split("/"), "ok", ratio={str(b): r for b, r in zip((1, 8), ratios, strict=False)})


FLOATS = [_measured("torch/float32", 1.0, 1.0), _measured("onnxruntime/float32", 0.8, 0.8)]


@pytest.mark.parametrize(
    ("int8", "trusted", "chosen", "note"),
    [
        ((0.6, 0.6), True, "onnxruntime/int8", None),  # 25 % less latency than the best float32
        ((0.75, 0.75), True, "onnxruntime/float32", "6% less latency than onnxruntime/float32, under the 10% margin"),
        (
            (0.6, 0.6),
            False,
            "onnxruntime/float32",
            "25% less latency than onnxruntime/float32, but on a timing flagged",
        ),
        ((0.75, 0.75), False, "onnxruntime/float32", "6% less latency than onnxruntime/float32, under the 10% margin"),
        ((0.9, 0.9), True, "onnxruntime/float32", None),  # slower than the best float32: nothing to say
    ],
)
def test_a_reduced_precision_is_chosen_only_by_a_margin_on_a_trusted_timing(int8, trusted, chosen, note):
    record, why = choose([*FLOATS, _measured("onnxruntime/int8", *int8)], trusted)
    assert record.name == chosen
    assert (why is None) if note is None else (note in why and why.endswith("onnxruntime/float32 kept"))


def test_the_reason_a_faster_form_was_left_aside_is_in_the_table_and_the_record():
    record = RuntimeRecord("onnxruntime", "float32", "auto", [1, 8], [*FLOATS], {}, {}, {}, [], "int8 ... kept")
    assert record.table().splitlines()[-1] == "note: int8 ... kept"
    assert RuntimeRecord.from_dict(record.to_dict()) == record
    assert choice_note(record, gated=True) is None  # the note is the record's, not said twice


def _gated(name: str, ok: bool, agreement: float, drop: float | None, *ratios: float) -> CandidateRecord:
    verdict = {"agreement": agreement, "accuracy_drop": drop, "ok": ok, "samples": 270}
    return replace(_measured(name, *ratios), gate=verdict, status="ok" if ok else "rejected")


def test_the_table_shows_each_gates_figures_and_marks_the_ratios_of_a_flagged_batch_size():
    """``trainfer compile``'s table said only ``passed``, and printed the ratios of a batch size its own
    warning flagged as if they held (0.014x eager on a starved run)."""
    candidates = [
        *FLOATS,
        _gated("onnxruntime/int8", True, 0.9963, -0.0037, 0.014, 0.29),
        _gated("openvino/int8", False, 0.9, 0.1),
        _gated("torch/bfloat16", True, 1.0, None, 1.5, 0.8),
    ]
    warning = "batch 1: latencies measured on a starved or busy machine, ..."
    record = RuntimeRecord("onnxruntime", "float32", "auto", [1, 8], candidates, {}, {}, {}, [warning])
    rows = {line.split()[0]: line for line in record.table().splitlines()}
    assert "passed 99.63%, -0.37 pt" in rows["onnxruntime/int8"]
    assert "FAILED 90.00%, +10.00 pt" in rows["openvino/int8"] and "passed 100.00%, -" in rows["torch/bfloat16"]
    assert rows["onnxruntime/int8"].split()[-2:] == ["0.014?", "0.29"]  # batch 1 flagged, batch 8 not
    assert rows["torch/float32"].split()[-2:] == ["1?", "1"] and rows["?:"].startswith("?: timed at batch 1, which")
    trusted = RuntimeRecord("onnxruntime", "float32", "auto", [1, 8], candidates, {}, {}, {}, [])
    assert "?" not in trusted.table()


def test_a_record_whose_warnings_are_as_many_as_it_keeps_marks_every_ratio():
    """A flagged batch size past the :data:`MAX_WARNINGS` a record keeps is named by no warning."""
    warnings = [f"batch {b}: latencies measured on a starved or busy machine" for b in range(1, MAX_WARNINGS + 1)]
    sizes = list(range(1, MAX_WARNINGS + 2))
    record = RuntimeRecord("torch", "float32", "auto", sizes, FLOATS, {}, {}, {}, warnings)
    assert record.untrusted_batches() == {str(b) for b in sizes}
    kept = RuntimeRecord("torch", "float32", "auto", sizes, FLOATS, {}, {"cpu": "x"}, {}, warnings).to_dict()
    assert RuntimeRecord.from_dict(kept).warnings == warnings  # runtime.json's schema takes as many, no more
    with pytest.raises(BundleError, match="warnings"):
        RuntimeRecord.from_dict({**kept, "warnings": [*warnings, warnings[0]]})
