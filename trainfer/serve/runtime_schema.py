"""The schema of a bundle's ``runtime.json``: every field typed and bounded, checked before anything is built.

``runtime.json`` is read from a bundle, so it is untrusted. :func:`check_record` validates the
parsed JSON with the same strict pydantic conventions as the manifest (:mod:`trainfer.serve.manifest`:
``"2"`` is not an integer, unknown fields are refused) and raises
:class:`~trainfer.errors.BundleError` naming the bad fields. Bounds: at most 64 candidates, 32
batch sizes (each 1..2**20), reasons up to 2000 characters, names up to 200; timings positive
and finite, keyed by batch size. Facts stated twice must agree: every candidate's runtime serves
its dtype (int8 only on the runtimes that run a QDQ file) unless it is recorded ``unavailable``,
and a record ``chosen_by`` ``"auto"`` names a candidate that passed (status ``ok``, and its gate
where it has one); a chosen dtype other than float32 is served only with its candidate's passing
gate verdict (a reduced precision is never served unchecked), one its own figures bear out: its
``ok`` recomputed from its samples, agreement, accuracies and errors against its limits, by the
gate's own rule (a verdict of 0 samples and agreement 0.0 against a 0.99 minimum marked ``ok`` is
refused). The chosen runtime is one of
:data:`~trainfer.serve.runtime_names.AUTO_RUNTIMES`: a runtime that generates and compiles code when
built (:data:`~trainfer.serve.runtime_names.CODE_GENERATING_RUNTIMES`, inductor) runs only when the
operator names it, never because a file does (a candidate may still list its figures). The file itself is read at most
:data:`MAX_RECORD_BYTES` long (:func:`trainfer.jsonfile.read_json`).

Imported only when a record is read (pydantic costs about 0.1 s to import).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from trainfer.errors import InputError
from trainfer.serve.gate import AccuracyGate, GateReport
from trainfer.serve.manifest import _Schema, schema_error
from trainfer.serve.runtime_names import AUTO_RUNTIMES, serves

#: The largest ``runtime.json`` read: a record of 64 candidates takes about 100 KiB.
MAX_RECORD_BYTES = 2**20
MAX_CANDIDATES = 64
MAX_BATCH = 2**20

RuntimeName = Literal["torch", "torch-channels-last", "inductor", "onnxruntime", "openvino"]
Dtype = Literal["float32", "bfloat16", "float16", "int8"]
Name = Annotated[str, Field(max_length=200)]
Reason = Annotated[str, Field(max_length=2000)]
Error = Annotated[float, Field(ge=0)]  # infinity allowed: a candidate whose output had the wrong shape
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
BatchKey = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,6}$")]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Timings = Annotated[dict[BatchKey, Positive], Field(max_length=32)]
Scalar = Name | Annotated[int, Field(ge=-(2**31), le=2**31)] | bool | None

__all__ = ["MAX_RECORD_BYTES", "check_record"]


class GateLimits(_Schema):
    min_agreement: Fraction | None
    max_accuracy_drop: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    max_rel_error: Error | None
    max_rms_error: Error | None = None  # absent from records written before regression gates
    max_mae_increase: Error | None = None


class GateVerdict(_Schema):
    """:meth:`trainfer.serve.gate.GateReport.to_dict`."""

    gate: GateLimits
    samples: Annotated[int, Field(ge=0, le=2**31)]
    max_rel_error: Error
    agreement: Fraction | None  # None: a regression output, judged by its values
    reference_accuracy: Fraction | None
    candidate_accuracy: Fraction | None
    task: Literal["classification", "binary", "regression"] = "classification"
    rms_error: Error | None = None
    reference_mae: Error | None = None
    candidate_mae: Error | None = None
    accuracy_drop: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] | None
    ok: bool

    def contradiction(self) -> str | None:
        """What the recorded figures say against the recorded ``ok`` (``None``: they agree), judged by the
        gate's own rule (:meth:`trainfer.serve.gate.GateReport.failures`) on the recorded limits."""
        figures = self.model_dump(exclude={"gate", "accuracy_drop", "ok"})
        report = GateReport(AccuracyGate(**self.gate.model_dump()), **figures)
        labelled = self.reference_accuracy is not None or self.reference_mae is not None
        try:
            report.gate.check_compares(self.task, labelled)
        except InputError as vacuous:
            return str(vacuous)
        drop, recorded = report.accuracy_drop, self.accuracy_drop
        if recorded is None or drop is None:
            agree = recorded is drop
        else:
            agree = abs(drop - recorded) <= 1e-9
        if not agree:
            return f"accuracy_drop {self.accuracy_drop} is not reference_accuracy - candidate_accuracy ({drop})"
        if report.ok != self.ok:
            verdict = "pass the gate" if report.ok else "fail the gate: " + "; ".join(report.failures())
            return f'"ok" is {str(self.ok).lower()}, but its figures {verdict}'
        return None


class Candidate(_Schema):
    runtime: RuntimeName
    dtype: Dtype
    status: Literal["ok", "unavailable", "rejected", "error"]
    reason: Reason | None = None
    max_rel_error: Error | None = None
    tolerance: Error | None = None
    gate: GateVerdict | None = None
    median_ms: Timings = {}
    ratio: Timings = {}


class Record(_Schema):
    runtime: RuntimeName
    dtype: Dtype
    chosen_by: Literal["given", "auto", "bundle"]
    batch_sizes: Annotated[list[Annotated[int, Field(ge=1, le=MAX_BATCH)]], Field(max_length=32)]
    candidates: Annotated[list[Candidate], Field(max_length=MAX_CANDIDATES)]
    threads: Annotated[dict[Name, Annotated[int, Field(ge=0, le=65536)]], Field(max_length=16)]
    machine: Annotated[dict[Name, Scalar | Annotated[dict[Name, bool], Field(max_length=64)]], Field(max_length=32)]
    versions: Annotated[dict[Name, Name], Field(max_length=16)]
    warnings: Annotated[list[Reason], Field(max_length=8)] = []  # runtime_record.MAX_WARNINGS
    choice: Reason | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Record:
        if self.runtime not in AUTO_RUNTIMES:
            raise ValueError(
                f"a runtime record may choose only {', '.join(AUTO_RUNTIMES)}; {self.runtime!r} generates and "
                f"compiles code when it is built, so it runs only when you name it: serve the bundle with "
                f"--runtime {self.runtime} (Python: runtime={self.runtime!r}), or record another with trainfer compile"
            )
        for c in self.candidates:
            if c.status != "unavailable" and not serves(c.runtime, c.dtype):
                raise ValueError(f"candidate {c.runtime}/{c.dtype}: {c.runtime} does not serve {c.dtype}")
        if not serves(self.runtime, self.dtype):
            raise ValueError(f"{self.runtime} does not serve {self.dtype}")
        if self.dtype != "float32":
            chosen = [c for c in self.candidates if (c.runtime, c.dtype) == (self.runtime, self.dtype)]
            if len(chosen) != 1 or chosen[0].gate is None or not chosen[0].gate.ok:
                raise ValueError(
                    f"the choice {self.runtime}/{self.dtype} is a reduced precision without exactly one candidate "
                    "whose gate passed: compile it with gate_data"
                )
            contradiction = chosen[0].gate.contradiction()
            if contradiction:
                raise ValueError(
                    f"the gate verdict of the choice {self.runtime}/{self.dtype} contradicts itself: {contradiction}"
                )
        if self.chosen_by == "auto":
            chosen = [c for c in self.candidates if (c.runtime, c.dtype) == (self.runtime, self.dtype)]
            if len(chosen) != 1 or chosen[0].status != "ok" or (chosen[0].gate is not None and not chosen[0].gate.ok):
                raise ValueError(
                    f"the choice {self.runtime}/{self.dtype} is not exactly one candidate that passed "
                    "(status ok, gate passed): the record contradicts itself"
                )
        return self


def check_record(data: Any, source: str) -> None:
    """Refuse (:class:`BundleError`) parsed ``runtime.json`` data that does not meet the schema."""
    try:
        Record.model_validate(data)
    except ValidationError as error:
        raise schema_error(error, f"invalid runtime record {source}") from None
