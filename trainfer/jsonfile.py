"""JSON that trainfer reads from files it does not control, bounded before it is parsed.

Every JSON file trainfer reads (a bundle's ``manifest.json``, ``runtime.json`` and
``quantization.json``, the manifest inside an exported model) goes through :func:`read_json` or
:func:`parse_json`. Before parsing, the text is checked against two limits, so that a small file
cannot exhaust the interpreter: at most ``max_bytes`` bytes (:data:`MAX_JSON_BYTES` unless the
caller bounds it tighter) and at most :data:`MAX_JSON_DEPTH` nested arrays/objects (``[[[...]]]``
100,000 deep would otherwise end in ``RecursionError``). Any failure (too large, too deep, not
UTF-8, not JSON, a 5000-digit integer, an object giving one key twice, which ``json`` would silently
resolve to the last) is the caller's ``error`` class naming the file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trainfer.errors import InputError, TrainferError
from trainfer.readfile import open_regular

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "json_depth", "parse_json", "read_json", "unique_keys"]

#: The largest JSON file trainfer parses: 16 MiB.
MAX_JSON_BYTES = 16 * 2**20
#: The deepest nesting of arrays and objects trainfer parses (its own files nest about 10 deep).
MAX_JSON_DEPTH = 100


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in ``data`` (0 for a scalar), in linear time.

    Exact for valid JSON (where a backslash only occurs in a string): a quote preceded by an odd
    run of backslashes is escaped, the others open and close strings, and a bracket counts when
    an even number of unescaped quotes precedes it. Vectorised: a 16 MiB file takes milliseconds.
    """
    text = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(text == ord('"'))
    suspect = quotes[(quotes > 0) & (text[quotes - 1] == ord("\\"))]  # wraps to text[-1] for quote 0: excluded
    if suspect.size:
        index = np.arange(text.size, dtype=np.int64 if text.size >= 2**31 else np.int32)
        plain = np.maximum.accumulate(np.where(text != ord("\\"), index, -1))  # the last non-backslash so far
        escaped = suspect[(suspect - 1 - plain[suspect - 1]) % 2 == 1]  # after an odd run of backslashes
        quotes = np.setdiff1d(quotes, escaped, assume_unique=True)
    brackets = np.flatnonzero((text == ord("[")) | (text == ord("{")) | (text == ord("]")) | (text == ord("}")))
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    if not brackets.size:
        return 0
    opening = (text[brackets] == ord("[")) | (text[brackets] == ord("{"))
    return int(np.cumsum(np.where(opening, 1, -1)).max())


def parse_json(
    data: str | bytes, source: str, *, max_bytes: int = MAX_JSON_BYTES, error: type[TrainferError] = InputError
) -> Any:
    """``data`` parsed as JSON once its size and nesting are within the limits; ``source`` names it in errors."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{source} is larger than {max_bytes} bytes ({len(raw)}): not a file trainfer reads")
    opened = raw.count(b"[") + raw.count(b"{")  # no deeper than this: measured only past the limit (a short line
    depth = json_depth(raw) if opened > MAX_JSON_DEPTH else opened  # of many read: 5 us, not 20 us)
    if depth > MAX_JSON_DEPTH:
        raise error(
            f"{source} is not valid JSON for trainfer: arrays/objects nest {depth} deep "
            f"(at most {MAX_JSON_DEPTH} allowed)"
        )
    try:
        return json.loads(raw, object_pairs_hook=functools.partial(unique_keys, refuse=_twice(source, error)))
    except TrainferError:  # a key given twice, already named
        raise
    except (ValueError, RecursionError) as problem:  # bad JSON, bad UTF-8, a 5000-digit integer
        raise error(f"{source} is not valid JSON: {problem}") from None


def unique_keys(pairs: list[tuple[str, Any]], refuse: Callable[[str], TrainferError]) -> dict[str, Any]:
    """One JSON object's ``(key, value)`` pairs as a dict (``json.loads``'s ``object_pairs_hook``), raising
    ``refuse(key)`` for a key given twice, which ``json`` would silently resolve to the last."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise refuse(key)
        seen.add(key)
    return dict(pairs)


def _twice(source: str, error: type[TrainferError]) -> Callable[[str], TrainferError]:
    return lambda key: error(
        f"{source} is not valid JSON: the key {key!r} is given twice in one object (expected once)"
    )


def read_json(
    path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES, error: type[TrainferError] = InputError
) -> Any:
    """The JSON file at ``path``, parsed by :func:`parse_json`: a regular file
    (:func:`trainfer.readfile.open_regular`: anything else is refused, never waited on), its size checked
    before it is read."""
    file = Path(path)
    source = repr(str(file))
    try:
        with open_regular(file, error) as handle:  # a FIFO or a device is refused, never waited on
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise error(f"{source} is larger than {max_bytes} bytes ({size}): not a file trainfer reads")
            data = handle.read(max_bytes + 1)  # a file growing meanwhile is still bounded
    except OSError as problem:
        raise error(f"cannot read {source}: {problem.strerror or problem}") from None
    return parse_json(data, source, max_bytes=max_bytes, error=error)
