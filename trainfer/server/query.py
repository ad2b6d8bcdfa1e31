"""The query parameters of the file endpoints (``/predict``, ``/explain``), read strictly.

A parameter given twice is refused (``target=1&target=2`` silently meant 2), and an integer is a
plain ASCII decimal, as :func:`trainfer.number_text.parse_digits` reads it (``1_0``, read by
Python's ``int`` as 10, and ``1.0``, ``+1``, `` 1`` were taken as integers): each a 400 naming
the parameter and the value. Parameters these endpoints do not take are ignored, as before. The
same declarations give the routes' OpenAPI entries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Scope

from trainfer.errors import InputError
from trainfer.number_text import EXPECTED_DIGITS, parse_digits

__all__ = ["EXPLAIN", "PREDICT", "Parameter", "openapi_parameters", "read_query"]


@dataclass(frozen=True)
class Parameter:
    """One query parameter: its name, whether it is an integer, its default and what it means."""

    name: str
    integer: bool
    default: Any
    description: str


PREDICT = (
    Parameter("filename", False, "upload", "the file's name: its type is read from its content; echoed in the ids"),
    Parameter("top_k", True, None, "classes (a sequence model: hypotheses) ranked for each sample"),
)
EXPLAIN = (
    Parameter("filename", False, "upload", "the file's name: its type is read from its content; echoed in the id"),
    Parameter("target", True, None, "the class or output explained (default: the predicted class)"),
)


def read_query(scope: Scope, parameters: tuple[Parameter, ...]) -> dict[str, Any]:
    """Each of ``parameters`` from the request's query string (its default when absent); a parameter
    given more than once, or an integer that is not plain ASCII decimal digits, is an :class:`InputError`."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    repeated = [f"{name!r} {count} times" for name, count in Counter(name for name, _ in pairs).items() if count > 1]
    if repeated:
        raise InputError(f"query parameter(s) given more than once: {', '.join(repeated)}; give each once")
    given = dict(pairs)
    return {p.name: _value(p, given[p.name]) if p.name in given else p.default for p in parameters}


def _value(parameter: Parameter, text: str) -> Any:
    if not parameter.integer:
        return text
    try:
        return parse_digits(text)
    except ValueError:
        raise InputError(f"query parameter {parameter.name}={text!r}: expected {EXPECTED_DIGITS}") from None


def openapi_parameters(parameters: tuple[Parameter, ...]) -> dict[str, Any]:
    """``parameters`` as a route's ``openapi_extra`` entry (FastAPI adds them to the path's own)."""
    return {
        "parameters": [
            {
                "name": p.name,
                "in": "query",
                "required": False,
                "description": p.description,
                "schema": {"type": "integer" if p.integer else "string", "default": p.default},
            }
            for p in parameters
        ]
    }
