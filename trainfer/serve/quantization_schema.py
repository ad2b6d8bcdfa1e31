"""The schema of a bundle's ``quantization.json``: the int8 record, checked before its form is served.

``quantization.json`` is read from a bundle, so it is untrusted. :func:`check_int8_record` validates
the parsed JSON with the strict pydantic conventions of the manifest and ``runtime.json``
(:mod:`trainfer.serve.manifest`, :mod:`trainfer.serve.runtime_schema`: ``"2"`` is not an integer,
unknown fields are refused) and raises :class:`~trainfer.errors.BundleError` naming the bad fields.
A ``format_version`` newer than :data:`INT8_FORMAT_VERSION` is a record this trainfer cannot read.
The files it names are the bundle's own (``quantized.onnx``, ``probes.safetensors``, each with a
sha256 of 64 hex digits). Its report's gate verdict passed, and its figures bear that out (recomputed
by the gate's own rule, as ``runtime.json``'s are: an infinite ``max_rel_error``, outputs holding NaN or
inf, fails it): an int8 form is served only on a passing gate. An SQNR of the sensitivity ranking is
finite or +inf (a layer quantized without noise), as trainfer writes it; NaN and -inf are refused.
Bounds: names up to 200 characters, texts up to 2000 (the equalization summary 20000), at most
4096 layers in the sensitivity ranking and the float fallbacks, 64 attempts, 32 settings.

Serving never rests on this record alone: the file's operators, its cost and its agreement with the
float weights on the stored probes are checked at every load (:mod:`trainfer.serve.int8_form`).
Imported only when an int8 form is loaded (pydantic costs about 0.1 s to import).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator

from trainfer.errors import BundleError
from trainfer.serve.bundle_format import MADE_BY
from trainfer.serve.manifest import _Schema, schema_error
from trainfer.serve.runtime_schema import GateVerdict, Name, Reason, Scalar

#: The newest int8 record this trainfer reads (what :func:`trainfer.serve.int8_form.write_int8_form` writes).
INT8_FORMAT_VERSION = 2
MAX_LAYERS = 4096

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _decibels(value: float) -> float:
    """An SQNR as :func:`trainfer.serve.sensitivity.sensitivity` writes it: finite, or +inf for a layer
    whose quantization adds no noise; never NaN or -inf."""
    if value != value or value == -math.inf:
        raise ValueError(f"an SQNR is finite, or +inf for a layer quantized without noise; got {value}")
    return value


Decibels = Annotated[float, Field(allow_inf_nan=True), AfterValidator(_decibels)]

__all__ = ["INT8_FORMAT_VERSION", "check_int8_record"]


class Probes(_Schema):
    file: Name  # which file, and that it is the bundle's own: read_probes checks
    sha256: Digest


class Sensitivity(_Schema):
    """:class:`trainfer.serve.sensitivity.LayerSensitivity`."""

    name: Name
    sqnr_db: Decibels
    weight_sqnr_db: Decibels
    channel_range: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=3, max_length=3)]


class Report(_Schema):
    """:meth:`trainfer.serve.quantize.QuantizationReport.to_dict`."""

    gate: GateVerdict
    sensitivity: Annotated[list[Sensitivity], Field(max_length=MAX_LAYERS)]
    float_layers: Annotated[list[Name], Field(max_length=MAX_LAYERS)]
    attempts: Annotated[list[Reason], Field(max_length=64)]
    settings: Annotated[dict[Name, Scalar], Field(max_length=32)]
    equalization: Annotated[str, Field(max_length=20000)] | None = None

    @model_validator(mode="after")
    def _gate_passed(self) -> Report:
        if not self.gate.ok:
            raise ValueError("the int8 form's gate verdict failed: an int8 form is served only on a passing gate")
        contradiction = self.gate.contradiction()
        if contradiction:
            raise ValueError(f"the int8 form's gate verdict contradicts itself: {contradiction}")
        return self


class Int8Record(_Schema):
    format: Literal["trainfer-quantized"]
    format_version: Annotated[int, Field(ge=1, le=INT8_FORMAT_VERSION)]
    file: Name  # its one name: bundle_format.int8_record checks
    sha256: Digest
    probes: Probes
    made_by: Name | None = None  # absent in records written before it existed
    report: Report

    @model_validator(mode="after")
    def _made_by_trainfer(self) -> Int8Record:
        if self.made_by is not None and self.made_by not in MADE_BY:
            raise ValueError(f"made_by must be one of {list(MADE_BY)}; found {self.made_by!r}")
        return self


def check_int8_record(data: Any, source: str) -> None:
    """Refuse (:class:`BundleError`) a parsed ``quantization.json`` that does not meet the schema."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if type(version) is int and version > INT8_FORMAT_VERSION:
        raise BundleError(
            f"{source} has format_version {version}; this trainfer reads int8 records up to "
            f"{INT8_FORMAT_VERSION}: upgrade trainfer, or quantize the bundle again with this one"
        )
    try:
        Int8Record.model_validate(data)
    except ValidationError as error:
        raise schema_error(error, f"invalid int8 record {source}") from None
