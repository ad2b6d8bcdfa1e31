"""The KServe v2 / Open Inference Protocol's tensors over HTTP: requests decoded, responses encoded.

An inference request is a JSON object ``{"id"?, "parameters"?, "inputs": [{"name", "shape",
"datatype", "data" | parameters.binary_data_size}], "outputs"?: [{"name", "parameters"?}]}``; the
``data`` of a tensor is its elements in row-major order, flat or nested as its shape. With the
binary tensor data extension (what Triton's clients send by default) the JSON object is the first
``Inference-Header-Content-Length`` bytes of the body and each binary tensor follows it, in
order, little-endian, without padding. The response mirrors it: ``{"model_name", "id"?,
"outputs": [{"name", "shape", "datatype", "data" | parameters.binary_data_size}]}``.

Everything read here is untrusted: the header length, shapes, element counts and binary sizes are
checked against each other and against ``MAX_ELEMENTS`` before any array is built, a key named
twice in one JSON object is refused, and every mistake is an :class:`~trainfer.errors.InputError`
naming what was expected and what was given.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from trainfer.errors import InputError
from trainfer.jsonfile import unique_keys
from trainfer.number_text import EXPECTED_DIGITS, parse_digits
from trainfer.serve.readers import check_buildable_shape

#: The protocol's datatypes this server writes, as numpy dtypes (little-endian).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: The datatypes this server reads: the real numbers every served model takes. ``BOOL`` is only
#: written (a binary model's ``decision``), ``BYTES`` only written too (labels, text).
INPUT_DATATYPES = {name: dtype for name, dtype in DATATYPES.items() if name != "BOOL"}
#: Most elements one input tensor may declare (the body size limit bounds the bytes first).
MAX_ELEMENTS = 64_000_000
HEADER_LENGTH = "inference-header-content-length"

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "INPUT_DATATYPES",
    "MAX_ELEMENTS",
    "InferRequest",
    "datatype_of",
    "decode_request",
    "encode_response",
]


@dataclass
class InferRequest:
    """A decoded inference request: its id, input arrays by name, and the outputs asked for.

    ``outputs`` maps each requested output name to whether it goes back as binary data (its own
    ``binary_data``, else the request's ``binary_data_output``: ``binary_outputs``); ``None`` means every
    output, as binary when ``binary_outputs``.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool] | None = None
    binary_outputs: bool = False


def datatype_of(dtype: np.dtype[Any] | str) -> str:
    """The protocol's name of a numpy dtype (``float32`` -> ``FP32``; text -> ``BYTES``)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "USO":
        return "BYTES"
    for name, known in DATATYPES.items():
        if known == dtype.newbyteorder("<") or known == dtype:
            return name
    raise InputError(f"no protocol datatype for numpy dtype {dtype}")


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request in ``body``; ``header_length`` is the ``Inference-Header-Content-Length`` header, if any."""
    size = _header_size(header_length, len(body))
    document = _json_object(body[:size])
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError('expected "inputs": a non-empty list of tensors {"name", "shape", "datatype", "data"}')
    _check_unique_keys(body[:size], document, [tensor.get("data") for tensor in inputs if isinstance(tensor, dict)])
    binary = memoryview(body)[size:]
    offset = 0
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(inputs):
        name, array, used = _input_tensor(tensor, index, binary[offset:])
        if name in arrays:
            raise InputError(f"input {name!r} is given twice")
        arrays[name] = array
        offset += used
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data follow the JSON that no input claims")
    binary_outputs = _flag(_parameters(document), "binary_data_output", "the request")
    return InferRequest(
        id=_optional_text(document.get("id"), "id"),
        inputs=arrays,
        outputs=_requested_outputs(document.get("outputs"), binary_outputs),
        binary_outputs=binary_outputs,
    )


def _header_size(header_length: str | None, total: int) -> int:
    """The JSON header's bytes: ``header_length`` (the header's value, decoded as latin-1; a count as
    :func:`trainfer.number_text.parse_digits` reads it, the query's integers' rule, so ``1_15``, ``+115``
    and `` 115 `` are refused), or the whole body."""
    if header_length is None:
        return total
    try:
        size = parse_digits(header_length)
    except ValueError:  # its bytes shown escaped (ascii), never as latin-1 mojibake
        raise InputError(
            f"Inference-Header-Content-Length must be {EXPECTED_DIGITS}; got {ascii(header_length[:40])}"
        ) from None
    if not 0 < size <= total:
        raise InputError(f"Inference-Header-Content-Length {size} does not fit a body of {total} bytes")
    return size


def _json_object(data: bytes) -> dict[str, Any]:
    """The JSON object in ``data``: parsed by orjson (a request's header in well under a microsecond);
    what orjson refuses is parsed again by the standard library, which accepts what JSON allows
    beyond orjson's bounds (integers past 64 bits) or names precisely what it refuses."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        document = _standard_json(data)
    if not isinstance(document, dict):
        raise InputError(f"expected a JSON object as the inference request; got {type(document).__name__}")
    return document


def _check_unique_keys(text: bytes, document: dict[str, Any], numbers: list[Any]) -> None:
    """Refuse a request whose JSON ``text`` names a key twice in one object (``"shape"`` twice: a
    parser keeps one value silently); ``document`` is its parse and ``numbers`` its inputs' ``data``,
    which hold numbers only in a valid request and are not walked (a key or a colon in them makes
    the counts below differ, and the exact parse decides).

    Exact at the cost of one byte count and a walk of the document's few objects: outside strings,
    each colon of JSON text separates a key from its value, so the text's colons number the keys of
    its objects plus the colons in its strings. The document, which holds one key of each repeated
    one, has as many only if no key is repeated. An escaped colon (``\\u003a``) would be a colon of
    the document's strings only: with one in the text, as when the counts differ, the standard
    library parses the text again, refusing a repeated key by name as it builds each object.
    """
    escaped = b"\\" in text and (b"\\u003a" in text or b"\\u003A" in text)
    if not escaped and text.count(b":") == _keys_and_colons(document, {id(data) for data in numbers}):
        return
    _standard_json(text, object_pairs_hook=functools.partial(unique_keys, refuse=_repeated_key))


def _keys_and_colons(document: Any, skipped: set[int]) -> int:
    """The keys of the objects in ``document`` (parsed JSON: exactly dicts, lists, strings, numbers,
    booleans and None) plus the colons in its strings, keys included, not looking into the lists or
    objects whose ``id`` is in ``skipped``."""
    count, stack = 0, [document]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            count += len(value)
            value = [*value, *value.values()]
        for item in value:
            kind = type(item)
            if kind is str:
                count += item.count(":")
            elif (kind is dict or kind is list) and id(item) not in skipped:
                stack.append(item)
    return count


def _repeated_key(key: str) -> InputError:
    return InputError(
        f"the request names the key {key!r:.60} twice in one JSON object: expected each key once "
        "(which value was meant would be a guess)"
    )


def _standard_json(data: bytes, **options: Any) -> Any:
    """``data`` parsed by the standard library (``options``: more of ``json.loads``'s)."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, **options)
    except InputError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InputError("the request body's JSON is nested too deeply") from None
    except ValueError:  # int() past sys.get_int_max_str_digits: a number no tensor could hold
        raise InputError("the request holds a JSON number too long to be converted") from None


def _refuse_constant(name: str) -> Any:
    raise InputError(f"the request holds {name}: JSON numbers must be finite")


def _parameters(document: dict[str, Any]) -> dict[str, Any]:
    parameters = document.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InputError(f'"parameters" must be a JSON object; got {type(parameters).__name__}')
    return parameters


def _flag(parameters: dict[str, Any], name: str, owner: str, default: bool = False) -> bool:
    """The boolean parameter ``name`` of ``owner`` (``default`` when absent): a JSON ``true`` or ``false``
    only, as ``"false"`` (a non-empty string) would otherwise count as true."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InputError(f"parameter {name!r} of {owner} must be true or false (a JSON boolean); got {value!r:.40}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    """``value`` when absent or text the response can echo: JSON lets an escape (``\\ud800``) give a
    lone surrogate, which no UTF-8 encoder writes back."""
    if value is None:
        return value
    if not isinstance(value, str):
        raise InputError(f'"{what}" must be a string; got {type(value).__name__}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f'"{what}" must be valid Unicode text; got {value!r:.40} ({error.reason})') from None
    return value


def _input_tensor(tensor: Any, index: int, binary: memoryview) -> tuple[str, np.ndarray, int]:
    """``(name, array, binary bytes used)`` of the request's input number ``index``."""
    if not isinstance(tensor, dict):
        raise InputError(f"input {index} must be a JSON object; got {type(tensor).__name__}")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f'input {index} needs a "name" (a non-empty string)')
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in INPUT_DATATYPES:
        served = list(INPUT_DATATYPES)
        raise InputError(
            f"input {name!r}: datatype {datatype!r:.40} is not served as an input; expected one of {served}"
        )
    dtype = INPUT_DATATYPES[datatype]
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise InputError(f'input {name!r}: "shape" must be a list of non-negative integers; got {shape!r:.80}')
    check_buildable_shape(shape, dtype.itemsize, f"input {name!r}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InputError(f"input {name!r}: shape {shape} holds {count} elements; at most {MAX_ELEMENTS} are accepted")
    size = _parameters(tensor).get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise InputError(f'input {name!r} has both "data" and parameters.binary_data_size: give one of them')
        return name, _binary_array(name, size, count, dtype, binary).reshape(shape), size
    if "data" not in tensor:
        raise InputError(f'input {name!r} has neither "data" nor parameters.binary_data_size')
    return name, _json_array(name, tensor["data"], shape, count, dtype), 0


def _binary_array(name: str, size: Any, count: int, dtype: np.dtype[Any], binary: memoryview) -> np.ndarray:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InputError(f"input {name!r}: binary_data_size must be a non-negative integer; got {size!r:.40}")
    if size != count * dtype.itemsize:
        raise InputError(
            f"input {name!r}: binary_data_size {size} != {count} elements x {dtype.itemsize} bytes ({dtype.name})"
        )
    if size > len(binary):
        raise InputError(f"input {name!r}: binary_data_size {size} exceeds the {len(binary)} bytes left in the body")
    return np.frombuffer(binary[:size], dtype=dtype).copy()


def _json_array(name: str, data: Any, shape: list[int], count: int, dtype: np.dtype[Any]) -> np.ndarray:
    if not isinstance(data, list):
        raise InputError(f'input {name!r}: "data" must be a list of numbers; got {type(data).__name__}')
    allowed, kind = _json_leaves(dtype)
    for leaf in _leaves(data):
        if type(leaf) not in allowed:  # json gives exactly bool, int, float, str, None, dict
            raise InputError(f'input {name!r}: "data" must hold {kind} only; found {leaf!r:.40}')
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise InputError(f'input {name!r}: "data" must hold {dtype.name} numbers only ({error})') from None
    if array.size != count:
        raise InputError(f"input {name!r}: shape {shape} needs {count} elements; data holds {array.size}")
    return array.reshape(shape)


def _json_leaves(dtype: np.dtype[Any]) -> tuple[tuple[type, ...], str]:
    """The JSON value types a tensor of ``dtype`` holds, and their name: an integer datatype takes
    integers only (``1.5`` would be truncated, ``1.0`` is a float in JSON), a real one any number."""
    if dtype.kind in "iu":
        return (int,), f"{dtype.name} integers"
    return (int, float), f"{dtype.name} numbers"


def _leaves(data: list[Any]) -> Any:
    """The non-list values of the nested lists ``data``, in order (without recursion)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def _requested_outputs(outputs: Any, binary: bool) -> dict[str, bool] | None:
    """The requested outputs' names and whether each is sent as binary data: its own ``binary_data``, else the
    request's ``binary_data_output`` (``binary``), as the binary tensor extension says; None when none is named."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InputError(f'"outputs" must be a list of {{"name"}} objects; got {type(outputs).__name__}')
    requested: dict[str, bool] = {}
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InputError(f'requested output {index} must be an object with a "name"')
        if output["name"] in requested:  # the two entries' parameters may differ: which one meant?
            raise InputError(f'requested output {output["name"]!r} is given twice in "outputs": name each once')
        requested[output["name"]] = _flag(_parameters(output), "binary_data", f"output {output['name']!r}", binary)
    return requested


def encode_response(
    model: str, request: InferRequest, outputs: dict[str, np.ndarray], version: str = "1"
) -> tuple[bytes, dict[str, str]]:
    """The response body for ``outputs`` (name -> array) and its extra headers.

    Only the outputs the request names are sent (all when it names none); an unknown name is an
    error listing the model's outputs. Binary outputs follow the JSON object, whose length the
    ``Inference-Header-Content-Length`` header then gives.
    """
    wanted = request.outputs if request.outputs is not None else dict.fromkeys(outputs, request.binary_outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise InputError(f"model {model!r} has no output(s) {unknown}: expected some of {list(outputs)}")
    tensors, blobs = [], []
    for name, binary in wanted.items():
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            blob = _to_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        tensors.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        document["id"] = request.id
    header = _json_bytes(document)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _json_bytes(document: dict[str, Any]) -> bytes:
    """``document`` as JSON (orjson), refusing NaN and infinities, which orjson would write as null
    (served scores are checked finite before: one here is a bug)."""
    for tensor in document["outputs"]:
        data = tensor.get("data")
        if data and isinstance(data[0], float) and not all(map(math.isfinite, data)):
            raise RuntimeError(f"output {tensor['name']!r} holds NaN or inf, which JSON cannot carry")
    return orjson.dumps(document)


def _to_bytes(array: np.ndarray) -> bytes:
    """The binary tensor data of ``array``: elements little-endian; text as 4-byte length + bytes each."""
    if array.dtype.kind in "USO":
        parts = []
        for value in array.reshape(-1).tolist():
            data = value if isinstance(value, bytes) else str(value).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
