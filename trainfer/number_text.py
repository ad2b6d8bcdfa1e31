"""Numbers written as text, read by one rule wherever trainfer reads them: command-line options, CSV cells,
request headers.

A number is ASCII: digits ``0-9``, an optional sign, and for a real number one decimal point, an exponent
(``1e-3``) or the spellings ``inf``, ``infinity`` and ``nan`` (any letter case; the option or the check
after reading decides whether a non-finite value is taken); ASCII spaces around it are ignored. Python's
``int()`` and ``float()`` read more: other scripts' digits (``int("١")`` is 1, ``float("𝟏")`` 1.0),
underscores (``"1_0"`` is 10) and non-ASCII spaces (``"1\\xa0"``): a typo such as ``--max-body-mb 1_6`` or
a CSV cell ``1_000`` would be read as another number than the one meant, so they are refused.

A count a request gives (a query parameter such as ``top_k``, the ``Inference-Header-Content-Length``
header) is stricter, :func:`parse_digits`: the digits ``0-9`` only, at most :data:`MAX_DIGITS` of them; no
sign, no spaces (``+1`` and `` 1 `` are refused).

For ASCII text without an underscore, ``float()`` and ``int()`` accept exactly this rule, so the check is
two C calls (``str.isascii`` and a search for ``_``), not a regular expression: :func:`parse_floats` checks a
CSV row's joined text once, then calls ``float()`` on each cell (a regular expression per cell cost four times
``float()`` itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from trainfer.errors import InputError

__all__ = [
    "EXPECTED_DIGITS",
    "EXPECTED_FLOAT",
    "EXPECTED_INTEGER",
    "MAX_DIGITS",
    "NumberTextError",
    "parse_digits",
    "parse_float",
    "parse_floats",
    "parse_integer",
]

#: The most digits :func:`parse_digits` reads (every count a request gives is far smaller).
MAX_DIGITS = 18

#: What a real number must look like, as error messages say it.
EXPECTED_FLOAT = "a number written in ASCII (digits 0-9, an optional sign, point and exponent; no underscores)"
#: What an integer must look like, as error messages say it.
EXPECTED_INTEGER = "an integer written in ASCII digits (0-9, an optional sign; no underscores)"
#: What a count given by a request must look like, as error messages say it.
EXPECTED_DIGITS = (
    "a whole number written with the digits 0-9 only "
    f"(no sign, point, underscore or space; at most {MAX_DIGITS} digits)"
)


class NumberTextError(InputError):
    """Text that is not a number by this module's rule; ``index`` is its position in the texts read
    (:func:`parse_floats`), 0 for one text."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


def _plain(text: str) -> bool:
    """Whether ``text`` is ASCII without underscores: then ``int()`` and ``float()`` read it by this module's rule."""
    return text.isascii() and "_" not in text


def parse_integer(text: str) -> int:
    """``text`` as an ``int`` by this module's rule (ASCII digits, an optional sign, ASCII spaces around);
    else :class:`NumberTextError` (an :class:`InputError`, so a ``ValueError``) naming what was given."""
    if _plain(text):
        try:
            return int(text)
        except ValueError:
            pass
    raise NumberTextError(f"expected {EXPECTED_INTEGER}; got {ascii(text)}")


def parse_digits(text: str) -> int:
    """``text`` as an ``int`` when it is 1 to :data:`MAX_DIGITS` ASCII digits ``0-9`` and nothing else;
    else :class:`NumberTextError` naming what was given."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_DIGITS:
        return int(text)
    raise NumberTextError(f"expected {EXPECTED_DIGITS}; got {ascii(text)}")


def parse_float(text: str) -> float:
    """``text`` as a ``float`` by this module's rule; else :class:`NumberTextError` naming what was given
    (non-ASCII characters escaped, as :func:`ascii` writes them)."""
    if _plain(text):
        try:
            return float(text)
        except ValueError:
            pass
    raise NumberTextError(f"expected {EXPECTED_FLOAT}; got {ascii(text)}")


def parse_floats(texts: Sequence[str]) -> list[float]:
    """Each of ``texts`` as by :func:`parse_float`, checked together (one check of their joined text: a CSV
    row costs what ``float()`` of its cells does); the first refused raises :class:`NumberTextError` with
    its ``index``."""
    if _plain("".join(texts)):
        try:
            return list(map(float, texts))
        except ValueError:
            pass
    values = []
    for index, text in enumerate(texts):
        try:
            values.append(parse_float(text))
        except NumberTextError as error:
            raise NumberTextError(str(error), index) from None
    return values
