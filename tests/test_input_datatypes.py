"""Every documented input datatype, end to end (attacker round 8: UINT64 was an HTTP 500, a CLI exit 3 and a
bare ``NotImplementedError`` from the Predictor, as torch implements no ``max`` for uint64 tensors).

The property: the same numbers give the same answer whichever datatype carries them. Numbers that float32
holds exactly answer as float32 does; uint16..uint64 read as int64, so any uint64 value up to 2**63 - 1
answers as the same int64 value, and a larger one is refused in one line naming it. A ``.npy`` header whose
shape holds a bool (numpy's reader takes ``True`` for 1) is a malformed header like any other.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import trainfer
from trainfer.cli import main
from trainfer.cli.quantize import read_labels
from trainfer.errors import InputError
from trainfer.models import digits_net
from trainfer.serve.calibration import class_indices
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import read_npy

BUNDLE = Path(__file__).parent / "fixtures" / "digits_deploy_v2"
SHAPE = (3, 1, 8, 8)
INT64_MAX = 2**63 - 1
#: The protocol's input datatypes (serving.md), by name and numpy dtype; BOOL is an output datatype only.
DATATYPES = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def exact_values(dtype, seed: int) -> np.ndarray:
    """A batch of random numbers that both ``dtype`` and float32 hold exactly (the dtype's extremes among them,
    where float32 holds them)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        span = 2048 if dtype == np.float16 else 2**24  # integers, and quarters below 2048: exact in both
        values = rng.integers(-span, span, size=SHAPE) / (4 if dtype == np.float16 else 1)
        return values.astype(dtype)
    info = np.iinfo(dtype)
    low, high = max(int(info.min), -(2**24)), min(int(info.max), 2**24)
    values = rng.integers(low, high, size=SHAPE, endpoint=True)
    values.flat[:2] = low, high
    return values.astype(dtype)


@pytest.fixture(scope="module", params=["bundle", "normalised"])
def predictor(request) -> trainfer.Predictor:
    """The fixture bundle's Predictor, and one recording a normalisation of scaled pixels (whose integer
    inputs are looked at for the unscaled-pixel warning: ``max`` of the batch, which uint64 lacked)."""
    if request.param == "bundle":
        return trainfer.Predictor.load(BUNDLE)
    torch.manual_seed(0)
    spec = {"input_shape": (1, 8, 8), "mean": (0.5,), "std": (0.25,)}
    return trainfer.Predictor(digits_net().eval(), task="classification", preprocess=spec)


def scores(results) -> np.ndarray:
    return np.array([[p for _, p in r.top_k] + [r.index] for r in results])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(DATATYPES))
@pytest.mark.filterwarnings("ignore:integer input with values above")
def test_the_predictor_answers_every_datatype_as_float32_of_the_same_numbers(predictor, name, seed):
    values = exact_values(DATATYPES[name], seed)
    expected = scores(predictor.predict(values.astype(np.float32), top_k=10))
    np.testing.assert_array_equal(scores(predictor.predict(values, top_k=10)), expected)
    if name != "UINT64" or values.max() <= INT64_MAX:  # torch holds each as a tensor too
        tensor = torch.from_numpy(values)
        np.testing.assert_array_equal(scores(predictor.predict(tensor, top_k=10)), expected)


@pytest.mark.filterwarnings("ignore:integer input with values above")
@pytest.mark.parametrize("make", [np.array, lambda values: torch.tensor(values, dtype=torch.uint64)])
def test_uint64_answers_as_int64_of_the_same_values_up_to_the_largest_int64(predictor, make):
    values = np.array([[0, 1, 2**40 + 1, INT64_MAX]] * 16, dtype=np.uint64).reshape(1, 1, 8, 8)
    expected = scores(predictor.predict(values.astype(np.int64), top_k=10))
    np.testing.assert_array_equal(scores(predictor.predict(make(values), top_k=10)), expected)


@pytest.mark.parametrize("make", [np.array, lambda values: torch.tensor(values, dtype=torch.uint64)])
def test_uint64_values_above_the_largest_int64_are_refused_naming_them(predictor, make):
    values = np.zeros((2, 1, 8, 8), dtype=np.uint64)
    values[1, 0, 0, :3] = INT64_MAX + 1, 2**64 - 1, 5
    with pytest.raises(InputError) as refused:
        predictor.predict(make(values))
    assert str(refused.value) == (
        f"uint64 input holds 2 value(s) above {INT64_MAX} (2**63 - 1, the largest int64), the largest "
        f"{2**64 - 1}: expected integers up to {INT64_MAX}, or float input"
    )


# -- the server ------------------------------------------------------------------------------------


def served(requests: list[tuple[str, bytes, tuple]]) -> list[tuple[int, bytes]]:
    """``(status, body)`` of each POST ``(path, body, headers)`` to an app serving the fixture as ``digits``."""
    pytest.importorskip("fastapi")
    from test_server_units import _ready, asgi_request

    from trainfer.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(bundles={"digits": str(BUNDLE)}))

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return [(await asgi_request(app, path, "POST", body, headers))[::2] for path, body, headers in requests]

    return asyncio.run(main())


def infer(name: str, values: np.ndarray, binary: bool) -> tuple[str, bytes, tuple]:
    """An inference request for ``values`` as the datatype ``name``, in JSON or binary."""
    path, tensor = "/v2/models/digits/infer", {"name": "input", "shape": list(values.shape), "datatype": name}
    if not binary:
        return path, json.dumps({"inputs": [{**tensor, "data": values.tolist()}]}).encode(), ()
    blob = values.astype(values.dtype.newbyteorder("<")).tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return path, header + blob, ((b"inference-header-content-length", str(len(header)).encode()),)


def upload(values: np.ndarray) -> tuple[str, bytes, tuple]:
    """A ``/predict`` request uploading ``values`` as a ``.npy`` file."""
    data = io.BytesIO()
    np.save(data, values)
    return "/v2/models/digits/predict?filename=x.npy&top_k=10", data.getvalue(), ()


def test_every_datatype_answers_as_float32_of_the_same_numbers_through_the_protocol_and_uploads():
    cases = [(name, seed, binary) for name in sorted(DATATYPES) for seed in range(2) for binary in (False, True)]
    requests = []
    for name, seed, binary in cases:
        values = exact_values(DATATYPES[name], seed)
        as_float = values.astype(np.float32)
        requests += [infer(name, values, binary), infer("FP32", as_float, binary), upload(values), upload(as_float)]
    answers = served(requests)
    assert all(status == 200 for status, _ in answers), [body for status, body in answers if status != 200][:2]
    for index, case in enumerate(cases):
        infer_answer, infer_float, upload_answer, upload_float = answers[4 * index : 4 * index + 4]
        assert (infer_answer, upload_answer) == (infer_float, upload_float), case


def test_uint64_above_the_largest_int64_is_a_400_naming_it_through_the_protocol_and_uploads():
    values = np.full((1, 1, 8, 8), 2**64 - 1, dtype=np.uint64)
    for status, body in served([infer("UINT64", values, False), infer("UINT64", values, True), upload(values)]):
        assert status == 400 and f"holds 64 value(s) above {INT64_MAX}" in json.loads(body)["error"]


@pytest.mark.parametrize("elements_at_once", [64, 2**20])  # one sample at a time, or all
@pytest.mark.parametrize("order", ["<", ">"])
def test_a_uint64_npy_file_is_refused_counting_its_values_as_the_predictor_counts_the_array(
    tmp_path, monkeypatch, predictor, elements_at_once, order
):
    """Not the count of the first sample holding one: trainfer predict and /predict read a file a sample at a time."""
    monkeypatch.setattr("trainfer.integers._ELEMENTS_AT_ONCE", elements_at_once)
    values = np.zeros((5, 1, 8, 8), dtype=np.dtype(f"{order}u8"))
    values[1, 0, 0, :2], values[4, 0, 3, 3] = (2**63, 2**63 + 7), 2**64 - 2
    counted = f"holds 3 value(s) above {INT64_MAX} (2**63 - 1, the largest int64), the largest {2**64 - 2}: "
    with pytest.raises(InputError, match=re.escape(counted)):
        predictor.predict(values)
    np.save(tmp_path / "u64.npy", values)
    refused = CliRunner().invoke(main, ["predict", str(BUNDLE), str(tmp_path / "u64.npy")])
    assert refused.exit_code == 2 and f"uint64 file {str(tmp_path / 'u64.npy')!r} {counted}" in refused.output
    [(status, body)] = served([upload(values)])
    assert status == 400 and f"uint64 file 'x.npy' {counted}" in json.loads(body)["error"]


# -- the command line and the gates ----------------------------------------------------------------


def test_predict_reads_a_uint64_npy_as_the_same_numbers_in_float32(tmp_path):
    values = exact_values(np.uint64, 0)
    np.save(tmp_path / "u64.npy", values)
    np.save(tmp_path / "f32.npy", values.astype(np.float32))
    np.save(tmp_path / "huge.npy", np.full((1, 1, 8, 8), 2**64 - 1, dtype=np.uint64))
    runner = CliRunner()
    answers = [
        runner.invoke(main, ["predict", str(BUNDLE), str(tmp_path / f), "--top-k", "3"]) for f in ("u64.npy", "f32.npy")
    ]
    assert [a.exit_code for a in answers] == [0, 0], answers[0].output
    assert answers[0].output.replace("u64.npy", "f32.npy") == answers[1].output
    refused = runner.invoke(main, ["predict", str(BUNDLE), str(tmp_path / "huge.npy")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert refused.output.count("\n") == 1 and f"value(s) above {INT64_MAX}" in refused.output


def test_uint64_gate_data_and_labels_read_as_their_values_and_larger_ones_are_refused(tmp_path):
    from trainfer.serve.bundle_format import read_manifest
    from trainfer.serve.calibration import calibration_inputs

    manifest = read_manifest(BUNDLE)
    values = exact_values(np.uint64, 1)
    np.save(tmp_path / "u64.npy", values)
    np.save(tmp_path / "f32.npy", values.astype(np.float32))
    torch.testing.assert_close(
        calibration_inputs(tmp_path / "u64.npy", manifest),
        calibration_inputs(tmp_path / "f32.npy", manifest),
        rtol=0,
        atol=0,
    )
    labels = np.array([1, 9, 0], dtype=np.uint64)
    assert class_indices(labels, 10, 3).tolist() == [1, 9, 0]
    with pytest.raises(InputError, match=r"labels must be class indices in 0\.\.9 \(10 classes\); got 10"):
        class_indices(np.array([1, 10, 0], dtype=np.uint64), 10, 3)
    with pytest.raises(InputError, match=f"value\\(s\\) above {INT64_MAX}"):
        class_indices(np.array([1, 2**63, 0], dtype=np.uint64), 10, 3)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "wrapped.npy", np.array([1, 2**64 - 1], dtype=np.uint64))  # astype(int64) made it -1
    assert read_labels(tmp_path / "labels.npy").tolist() == [1, 9, 0]
    with pytest.raises(InputError, match=f"value\\(s\\) above {INT64_MAX}"):
        read_labels(tmp_path / "wrapped.npy")


# -- .npy headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", ["(True, 1, 8, 8)", "(1, 1, 8, False)", "(1.0, 1, 8, 8)", "(None, 1, 8, 8)", "('1', 1, 8, 8)"]
)
@pytest.mark.parametrize("mmap", [False, True])
def test_a_npy_header_shape_of_anything_but_integers_is_a_malformed_header(tmp_path, shape, mmap):
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    path = tmp_path / "forged.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 256)
    with pytest.raises(InputError, match="as a .npy array: a malformed or truncated header"):
        read_npy(path, PreprocessSpec(input_shape=(1, 8, 8)), mmap=mmap)


def test_the_unscaled_pixel_warning_looks_at_unsigned_batches_too():
    """The warning for an integer batch above 255 * pixel_scale takes the batch's ``max``, which torch lacks
    for uint64: it runs on the int64 the batch was read as."""
    spec = PreprocessSpec(input_shape=(1, 2, 2), mean=(0.5,), std=(0.25,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.prepare(np.full((1, 1, 2, 2), 300, dtype=np.uint64))
    assert [str(w.message).startswith("integer input with values above") for w in caught] == [True]
