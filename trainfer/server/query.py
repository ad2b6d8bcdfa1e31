"""The query parameters of the file endpoints (``/predict``, ``/explain``), read strictly.

A parameter given twice is refused (``target=1&target=2`` silently meant 2), an integer is a
plain ASCII decimal, as :func:`trainfer.number_text.parse_digits` reads it (``1_0``, read by
Python's ``int`` as 10, and ``1.0``, ``+1``, `` 1`` were taken as integers), and a number is read
as the command line reads one (:func:`trainfer.number_text.parse_float`: ASCII, no underscores):
each a 400 naming the parameter and the value. A parameter the endpoint does not take is a 400
naming it and those it takes (``threshold`` was once ignored, and the answer said 0.5). The same
declarations give the routes' OpenAPI entries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from starlette.types import Scope

from trainfer.errors import InputError
from trainfer.number_text import EXPECTED_DIGITS, EXPECTED_FLOAT, parse_digits, parse_float

__all__ = ["EXPLAIN", "PREDICT", "Parameter", "openapi_parameters", "read_query"]


@dataclass(frozen=True)
class Parameter:
    """One query parameter: its name, its type (``"string"``, ``"integer"``: digits only, ``"number"``:
    a real number), its default and what it means."""

    name: str
    type: Literal["string", "integer", "number"]
    default: Any
    description: str


PREDICT = (
    Parameter("filename", "string", "upload", "the file's name: its type is read from its content; echoed in the ids"),
    Parameter("top_k", "integer", None, "classes (a sequence model: hypotheses) ranked for each sample"),
    Parameter("threshold", "number", None, "a binary model's decision threshold in [0, 1] (default: the server's)"),
)
EXPLAIN = (
    Parameter("filename", "string", "upload", "the file's name: its type is read from its content; echoed in the id"),
    Parameter("target", "integer", None, "the class or output explained (default: the predicted class)"),
)


def read_query(scope: Scope, parameters: tuple[Parameter, ...]) -> dict[str, Any]:
    """Each of ``parameters`` from the request's query string (its default when absent); a parameter
    not among ``parameters``, one given more than once, an integer that is not plain ASCII decimal
    digits or a number that is not an ASCII number is an :class:`InputError`."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    taken = [p.name for p in parameters]
    unknown = sorted({name for name, _ in pairs} - set(taken))
    if unknown:
        raise InputError(
            f"query parameter(s) {', '.join(map(ascii, unknown))} unknown here; this endpoint takes {', '.join(taken)}"
        )
    repeated = [f"{name!r} {count} times" for name, count in Counter(name for name, _ in pairs).items() if count > 1]
    if repeated:
        raise InputError(f"query parameter(s) given more than once: {', '.join(repeated)}; give each once")
    given = dict(pairs)
    return {p.name: _value(p, given[p.name]) if p.name in given else p.default for p in parameters}


def _value(parameter: Parameter, text: str) -> Any:
    if parameter.type == "string":
        return text
    parse, expected = (parse_digits, EXPECTED_DIGITS) if parameter.type == "integer" else (parse_float, EXPECTED_FLOAT)
    try:
        return parse(text)
    except ValueError:
        raise InputError(f"query parameter {parameter.name}={text!r}: expected {expected}") from None


def openapi_parameters(parameters: tuple[Parameter, ...]) -> dict[str, Any]:
    """``parameters`` as a route's ``openapi_extra`` entry (FastAPI adds them to the path's own)."""
    return {
        "parameters": [
            {
                "name": p.name,
                "in": "query",
                "required": False,
                "description": p.description,
                "schema": {"type": p.type, "default": p.default},
            }
            for p in parameters
        ]
    }
