"""One rule for numbers written as text (``trainfer.number_text``), and each place that reads them: command-line
options (tests/test_cli_errors.py), CSV cells, the ``Inference-Header-Content-Length`` header.

Attacker round 8: Python's ``float()`` and ``int()`` read other scripts' digits, underscores and non-ASCII
spaces, so ``--max-body-mb '٢'`` served a 2 MiB limit, a CSV cell ``'١٠٠_٠'`` was 1000.0 and the header
``1_15`` was 115.
"""

from __future__ import annotations

import json
import math

import pytest

from trainfer.errors import InputError
from trainfer.number_text import (
    EXPECTED_DIGITS,
    EXPECTED_FLOAT,
    EXPECTED_INTEGER,
    NumberTextError,
    parse_digits,
    parse_float,
    parse_floats,
    parse_integer,
)
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import iter_csv
from trainfer.server.protocol import decode_request

#: Text Python reads as a number and this rule does not: other scripts' digits, underscores, non-ASCII spaces.
NOT_ASCII_NUMBERS = [
    "١",  # Arabic-Indic one
    "١٠٠_٠",
    "1_0",
    "1_000.5",
    "1e1_0",
    "𝟏",  # mathematical bold one
    "１",  # full-width one
    "\u20071",  # figure space
    "1\xa0",  # no-break space
    "\u30001",  # ideographic space
]


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1.0), (" 1 ", 1.0), ("\t-2.5", -2.5), ("+1e3", 1000.0), (".5", 0.5), ("1.", 1.0), ("1E-3", 0.001)],
)
def test_ascii_numbers_read_as_python_reads_them(text, value):
    assert parse_float(text) == value == parse_floats([text, "0"])[0]


def test_the_non_finite_spellings_read_for_the_caller_to_judge():
    assert [str(parse_float(t)) for t in ("inf", "-Infinity", "NaN", "+nan")] == ["inf", "-inf", "nan", "nan"]
    assert math.isnan(parse_floats(["1", "nan"])[1])


@pytest.mark.parametrize("text", [*NOT_ASCII_NUMBERS, "", " ", "0x10", "1,5", "e5", "1e", "--1", "1 2", "Ⅻ"])
def test_anything_else_is_refused_naming_it_escaped(text):
    with pytest.raises(NumberTextError) as refused:
        parse_float(text)
    assert str(refused.value) == f"expected {EXPECTED_FLOAT}; got {ascii(text)}"
    assert str(refused.value).isascii()  # never mojibake: other characters escaped as ascii() writes them


@pytest.mark.parametrize("text", [*NOT_ASCII_NUMBERS, "1.0", "1e3", "", "0x10"])
def test_integers_are_ascii_digits_with_a_sign(text):
    assert [parse_integer(t) for t in ("7", "-7", "+7", " 7 ", "007")] == [7, -7, 7, 7, 7]
    with pytest.raises(NumberTextError) as refused:
        parse_integer(text)
    assert str(refused.value) == f"expected {EXPECTED_INTEGER}; got {ascii(text)}"


def test_a_row_names_its_first_refused_cell_by_position():
    with pytest.raises(NumberTextError) as refused:
        parse_floats(["1", "2", "1_0", "١"])
    assert refused.value.index == 2 and ascii("1_0") in str(refused.value)
    assert parse_floats([]) == []


# -- CSV cells -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", NOT_ASCII_NUMBERS)
def test_a_csv_cell_not_written_in_ascii_is_refused_naming_line_column_and_cell(tmp_path, cell):
    path = tmp_path / "rows.csv"
    path.write_text(f'a,b\n1,2\n3,"{cell}"\n', encoding="utf-8")
    with pytest.raises(InputError) as refused:
        list(iter_csv(path, PreprocessSpec(columns=("a", "b"))))
    assert (
        str(refused.value) == f"CSV file {str(path)!r} line 3, column 'b': expected {EXPECTED_FLOAT}; got {ascii(cell)}"
    )


def test_csv_cells_in_ascii_read_as_before(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n 1 ,-2.5e1\n+.5,inf\n", encoding="utf-8")
    values = next(iter_csv(path, PreprocessSpec(columns=("a", "b")))).tolist()
    assert values == [[1.0, -25.0], [0.5, math.inf]]  # inf: refused later by the finiteness check, as before


def test_a_csv_upload_follows_the_same_rule():
    pytest.importorskip("fastapi")
    from trainfer.server.uploads import read_upload

    with pytest.raises(InputError, match=r"line 2, column 'x': expected a number written in ASCII .*; got '1_0'"):
        read_upload(b"x\n1_0\n", "up.csv", "text/csv", PreprocessSpec(), max_rows=10)


# -- the Inference-Header-Content-Length header ------------------------------------------------------

ONE = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'


SIZE = str(len(ONE))
#: The header's length in Arabic-Indic and full-width digits, with an underscore, in hexadecimal.
LENGTHS = [SIZE.translate(str.maketrans("0123456789", digits)) for digits in ("٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９")]
LENGTHS += [f"{SIZE[0]}_{SIZE[1:]}", hex(len(ONE))]
#: ... and with a sign or spaces, which :func:`parse_integer` reads (the query's integers never took them).
LENGTHS += [f"+{SIZE}", f" {SIZE} ", f"{SIZE} ", f"\t{SIZE}", f"0{SIZE}.0", "-0"]


@pytest.mark.parametrize("length", LENGTHS)
def test_the_header_length_is_an_integer_in_ascii_digits(length):
    with pytest.raises(InputError) as refused:
        decode_request(ONE, length.encode().decode("latin-1"))  # as the server decodes a header's bytes
    message = str(refused.value)
    assert message.startswith(f"Inference-Header-Content-Length must be {EXPECTED_DIGITS}; got '") and message.isascii()
    assert decode_request(ONE, str(len(ONE))).inputs["x"].tolist() == [1.0]


@pytest.mark.parametrize("text", ["0", "7", "007", "9" * 18])
def test_parse_digits_reads_ascii_digits_as_int_reads_them(text):
    assert parse_digits(text) == int(text)


@pytest.mark.parametrize("text", ["", "+1", "-1", " 1", "1 ", "1_0", "1.0", "1e1", "٢", "１", "9" * 19])
def test_parse_digits_refuses_anything_but_one_to_eighteen_ascii_digits(text):
    with pytest.raises(NumberTextError, match=r"expected a whole number written with the digits 0-9 only"):
        parse_digits(text)


@pytest.mark.parametrize("prefix, suffix", [("+", ""), (" ", " "), ("", " "), ("00", ""), ("", "")])
def test_the_header_with_a_sign_or_spaces_is_a_400_as_a_query_integer_is(prefix, suffix):
    """``+115`` and `` 115 `` were read as 115 (the CLI's integer rule) while ``top_k=+1`` is a 400:
    the header takes the query's rule, ASCII digits only; leading zeros are digits, so taken."""
    pytest.importorskip("fastapi")
    import asyncio

    from test_server_units import _digits_app, _ready, asgi_request

    app = _digits_app()
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]})
    length = f"{prefix}{len(body)}{suffix}"

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            headers = ((b"inference-header-content-length", length.encode()),)
            return await asgi_request(app, "/v2/models/digits/infer", "POST", body.encode(), headers)

    status, _, answer = asyncio.run(main())
    if prefix.isdigit() or prefix == suffix == "":
        assert status == 200, answer
        return
    assert (status, json.loads(answer)) == (
        400,
        {"error": f"Inference-Header-Content-Length must be {EXPECTED_DIGITS}; got {length!r}"},
    )
    assert b"\n" not in answer.strip()


def test_the_header_given_twice_with_different_values_is_a_400():
    pytest.importorskip("fastapi")
    import asyncio

    from test_server_units import _digits_app, _ready, asgi_request

    app = _digits_app()
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]})
    size = str(len(body)).encode()
    name = b"inference-header-content-length"

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            path = "/v2/models/digits/infer"
            twice = await asgi_request(app, path, "POST", body.encode(), ((name, size), (name, b"1")))
            same = await asgi_request(app, path, "POST", body.encode(), ((name, size), (name, size)))
            return twice, same

    (status, _, answer), same = asyncio.run(main())
    assert (status, json.loads(answer)) == (
        400,
        {
            "error": f"header inference-header-content-length given twice with different values, "
            f"{ascii(size.decode())} and '1': send it once"
        },
    )
    assert same[0] == 200
