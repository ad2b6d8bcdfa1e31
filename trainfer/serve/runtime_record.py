"""What ``trainfer.compile`` chose and why: candidate and runtime records, the machine, ``runtime.json``.

A :class:`RuntimeRecord` holds the chosen runtime and dtype, every candidate's figures (or why it was left
out, :class:`CandidateRecord`), the thread settings and the machine (:func:`machine_info`: CPU flags that
decide bf16/int8 speed). :func:`save_record` writes it into a bundle as ``runtime.json``; :func:`read_record`
reads it back, refusing anything malformed with :class:`~trainfer.errors.BundleError`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from trainfer.atomic import atomic_file
from trainfer.errors import BundleError
from trainfer.jsonfile import read_json
from trainfer.serve.runtime_names import AUTO_RUNTIMES, QUANTIZED_RUNTIMES, RUNTIMES, SUPPORTED_DTYPES

RUNTIME_FILE = "runtime.json"
#: A reduced precision (bf16, int8) is chosen only with at least this much less latency than the best float32
#: form (geometric mean of the latency ratios, same run): a smaller gain is within timing noise, and not worth
#: the accuracy a reduced precision gives up.
REDUCED_MARGIN = 0.10
TORCH_RUNTIMES = ("torch", "torch-channels-last", "inductor")
#: The most warnings a record keeps (``runtime.json``'s schema, :mod:`trainfer.serve.runtime_schema`, takes no
#: more): one per batch size whose timing was flagged.
MAX_WARNINGS = 8
#: How a warning names the batch size whose timing it flags (:func:`trainfer.serve.runtime._measure` writes it).
_FLAGGED = re.compile(r"batch ([0-9]+): ")
_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

__all__ = [
    "AUTO_RUNTIMES",
    "MAX_WARNINGS",
    "QUANTIZED_RUNTIMES",
    "REDUCED_MARGIN",
    "RUNTIMES",
    "RUNTIME_FILE",
    "SUPPORTED_DTYPES",
    "TORCH_RUNTIMES",
    "CandidateRecord",
    "RuntimeRecord",
    "choose",
    "machine_info",
    "read_record",
    "runtime_versions",
    "save_record",
    "thread_settings",
]


@dataclass
class CandidateRecord:
    """One runtime/dtype pair: whether it could serve, its error, and its latency per batch size.

    ``status``: ``ok``, ``unavailable`` (not installed, or the CPU lacks the dtype), ``rejected``
    (failed verification or the gate) or ``error`` (building or running it raised). ``median_ms``
    and ``ratio`` (to eager float32, measured in the same run) are keyed by batch size.
    """

    runtime: str
    dtype: str
    status: str
    reason: str | None = None
    max_rel_error: float | None = None
    tolerance: float | None = None
    gate: dict[str, Any] | None = None
    median_ms: dict[str, float] = field(default_factory=dict)
    ratio: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.runtime}/{self.dtype}"

    @property
    def score(self) -> float:
        """Geometric mean of the latency ratios (infinite when not measured)."""
        values = list(self.ratio.values())
        return math.exp(sum(map(math.log, values)) / len(values)) if values else math.inf


@dataclass
class RuntimeRecord:
    """Which runtime serves the model, why, on which machine, with which thread settings."""

    runtime: str
    dtype: str
    chosen_by: str
    batch_sizes: list[int]
    candidates: list[CandidateRecord]
    threads: dict[str, int]
    machine: dict[str, Any]
    versions: dict[str, str]
    #: Why the latencies cannot be trusted (:func:`trainfer.bench.conditions.untrusted`), one ``batch N: ...``
    #: line per batch size flagged (an older record names the first only); empty: nothing seen.
    warnings: list[str] = field(default_factory=list)
    #: Why a faster reduced precision was left aside (:func:`choose`); ``None``: the fastest form was chosen.
    choice: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "runtime record") -> RuntimeRecord:
        """Rebuild a record read from a file; anything malformed raises :class:`BundleError`."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
        runtime: Any = data.get("runtime")  # untrusted JSON: any value, checked here
        if not isinstance(runtime, str):
            raise BundleError(f"{source}: expected 'runtime' to be a string, got {type(runtime).__name__}")
        int8 = runtime in QUANTIZED_RUNTIMES and data.get("dtype") == "int8"
        if not int8 and data.get("dtype") not in SUPPORTED_DTYPES.get(runtime, ()):
            raise BundleError(
                f"{source}: runtime {runtime!r} with dtype {data.get('dtype')!r} is not one a record may choose: "
                f"{_recordable()}"
            )
        unexpected = sorted(set(data) - {f.name for f in fields(cls)})
        if unexpected:
            raise BundleError(f"{source}: unexpected fields: {unexpected}")
        from trainfer.serve.runtime_schema import check_record

        check_record(data, source)
        try:
            candidates = [CandidateRecord(**entry) for entry in data.get("candidates") or []]
            return cls(**{**data, "candidates": candidates})
        except TypeError as error:
            raise BundleError(f"{source}: unexpected fields: {error}") from None

    def untrusted_batches(self) -> set[str]:
        """The batch sizes (as ``ratio``'s keys) whose timings the run flagged, each named by a ``batch N:``
        warning; every batch size when the warnings are as many as a record keeps (:data:`MAX_WARNINGS`),
        since a flagged batch past those is named by none."""
        if len(self.warnings) >= MAX_WARNINGS:
            return {str(b) for b in self.batch_sizes}
        return {match.group(1) for warning in self.warnings if (match := _FLAGGED.match(warning))}

    def table(self) -> str:
        """The candidates' figures as a text table, best first: status, the gate's verdict with its agreement
        and accuracy drop (``-``: not gated), error, ratios (``?`` after a ratio timed at a flagged batch size)."""
        sizes = [str(b) for b in self.batch_sizes]
        untrusted = self.untrusted_batches()
        header = f"{'candidate':<30}{'status':<12}{'gate: agreement, drop':<25}{'rel error':>10}"
        lines = [header + "".join(f"{'x b' + s:>10}" for s in sizes)]
        for c in sorted(self.candidates, key=lambda c: (c.status != "ok", c.score)):
            error = f"{c.max_rel_error:.1e}" if c.max_rel_error is not None else "-"
            ratios = "".join(_ratio_cell(c.ratio.get(s), s in untrusted) for s in sizes)
            mark = " *" if (c.runtime, c.dtype) == (self.runtime, self.dtype) else ""
            note = f"  ({c.reason})" if c.reason else ""
            lines.append(f"{c.name + mark:<30}{c.status:<12}{_gate_cell(c.gate):<25}{error:>10}{ratios}{note}")
        threads = ", ".join(f"{k} {v}" for k, v in self.threads.items())
        flags = " ".join(f for f in _FLAGS if self.machine.get("flags", {}).get(f)) or "none of interest"
        lines.append(f"chosen: {self.runtime}/{self.dtype} ({self.chosen_by}); latency x eager float32, same run")
        if untrusted:
            batches = ", ".join(s for s in sizes if s in untrusted)
            lines.append(
                f"?: timed at batch {batches}, which this run flagged untrusted (warning below): not a valid ratio; "
                "a run with a flagged timing never chooses a reduced precision"
            )
        lines.append(f"threads: {threads}; machine: {self.machine.get('cpu')} [{flags}]")
        lines += [f"warning: {warning}" for warning in self.warnings]
        lines += [f"note: {self.choice}"] if self.choice else []
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _gate_cell(verdict: dict[str, Any] | None) -> str:
    """A gate's verdict in the table: ``passed``/``FAILED``, its class agreement and its accuracy drop in
    points (``-`` without labels); ``-`` for a candidate not gated."""
    if verdict is None:
        return "-"
    drop = verdict.get("accuracy_drop")
    shown = f"{100 * drop:+.2f} pt" if drop is not None else "-"
    return f"{'passed' if verdict.get('ok') else 'FAILED'} {verdict.get('agreement', math.nan):.2%}, {shown}"


def _ratio_cell(ratio: float | None, untrusted: bool) -> str:
    """A latency ratio in the table, ``-`` when not measured, marked ``?`` when timed at a flagged batch size."""
    if ratio is None:
        return f"{'-':>10}"
    return f"{ratio:>9.3g}?" if untrusted else f"{ratio:>9.3g} "


def choose(measured: list[CandidateRecord], trusted: bool) -> tuple[CandidateRecord, str | None]:
    """The candidate an ``"auto"`` search records among the ``measured`` ones, and why a faster one was not.

    The fastest (lowest :attr:`CandidateRecord.score`), unless it is a reduced precision: that one is chosen
    only on a ``trusted`` timing (:func:`trainfer.bench.conditions.untrusted` saw nothing) and with at least
    :data:`REDUCED_MARGIN` less latency than the best float32 form; otherwise that float32 form is.
    """
    fastest = min(measured, key=lambda c: c.score)
    floats = [c for c in measured if c.dtype == "float32"]
    if fastest.dtype == "float32" or not floats:
        return fastest, None
    best = min(floats, key=lambda c: c.score)
    gain = 1 - fastest.score / best.score
    if gain < REDUCED_MARGIN:
        why = f"under the {REDUCED_MARGIN:.0%} margin a reduced precision must win by"
    elif not trusted:
        why = "but on a timing flagged as untrusted (warning above): rerun compile on an idle machine"
    else:
        return fastest, None
    return best, f"{fastest.name} measured {gain:.0%} less latency than {best.name}, {why}: {best.name} kept"


def machine_info() -> dict[str, Any]:
    """The CPU's name, core count, the instruction-set flags that decide bf16/int8 speed, torch's ISA level."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in _FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_hardware": bool({"avx512_bf16", "amx_bf16"} & flags),
        "int8_dot_product": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
    }


def _recordable() -> dict[str, list[str]]:
    """The ``{runtime: dtypes}`` a ``runtime.json`` may choose: never a code-generating runtime (inductor),
    int8 on the runtimes that run a QDQ file."""
    return {
        name: [*SUPPORTED_DTYPES[name], *(["int8"] if name in QUANTIZED_RUNTIMES else [])] for name in AUTO_RUNTIMES
    }


def save_record(bundle: str | os.PathLike[str], record: RuntimeRecord) -> Path:
    """Write ``record`` as ``runtime.json`` into the bundle directory (atomically); return its path.

    The record is checked as a load checks it first, so trainfer never writes a record it would
    refuse (a bf16 or int8 choice without a passing accuracy gate, a choice of inductor, say).
    """
    from trainfer.serve.runtime_schema import check_record

    directory = Path(bundle)
    if not (directory / "manifest.json").is_file():
        raise BundleError(f"no trainfer bundle at {str(directory)!r}: expected a directory holding manifest.json")
    check_record(record.to_dict(), "to be written")  # the schema's message says what the record lacks
    with atomic_file(directory / RUNTIME_FILE) as tmp:
        tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")
    return directory / RUNTIME_FILE


def read_record(bundle: str | os.PathLike[str]) -> RuntimeRecord | None:
    """The bundle's recorded runtime choice, or ``None`` when it carries none."""
    file = Path(bundle) / RUNTIME_FILE
    if not file.is_file():
        return None
    from trainfer.serve.runtime_schema import MAX_RECORD_BYTES

    data = read_json(file, max_bytes=MAX_RECORD_BYTES, error=BundleError)
    return RuntimeRecord.from_dict(data, repr(str(file)))


def thread_settings(threads: int) -> dict[str, int]:
    """The intra/inter-op thread settings of torch and the threads every runtime was given."""
    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "measured_with": threads,
        "onnxruntime_intra_op": threads,
        "openvino_inference": threads,
    }


def runtime_versions() -> dict[str, str]:
    """The versions of torch and of the optional runtimes installed."""
    versions: dict[str, str] = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            continue
    return versions
