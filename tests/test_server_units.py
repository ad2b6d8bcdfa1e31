"""The server's parts in process: the protocol's tensor codec and the dynamic batcher (fast, no HTTP)."""

from __future__ import annotations

import ast
import asyncio
import ctypes
import io
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from time_limit import time_limit

from trainfer.errors import InputError
from trainfer.server.batching import DynamicBatcher, Overloaded
from trainfer.server.protocol import DATATYPES, INPUT_DATATYPES, InferRequest, decode_request, encode_response

NUMERIC = sorted(INPUT_DATATYPES)
ONE = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'


def split_response(body: bytes, headers: dict[str, str]) -> tuple[dict, bytes]:
    size = int(headers.get("inference-header-content-length", len(body)))
    return json.loads(body[:size]), body[size:]


@settings(max_examples=30)
@given(
    datatype=st.sampled_from(NUMERIC),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    binary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_tensor_survives_the_request_and_the_response_json_or_binary(datatype, shape, binary, seed):
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        array = (rng.standard_normal(shape) * 100).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    tensor = {"name": "input", "shape": shape, "datatype": datatype}
    if binary:
        blob = array.astype(dtype.newbyteorder("<")).tobytes()
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}).encode()
        decoded = decode_request(header + blob, str(len(header)))
    else:
        decoded = decode_request(json.dumps({"inputs": [{**tensor, "data": array.tolist()}]}).encode(), None)
    got = decoded.inputs["input"]
    assert got.dtype == dtype and got.shape == tuple(shape)
    np.testing.assert_array_equal(got, array)  # JSON numbers carry float16/32/64 and integers exactly

    request = InferRequest(id="x", inputs={}, outputs={"out": binary})
    body, headers = encode_response("m", request, {"out": array})
    document, rest = split_response(body, headers)
    (entry,) = document["outputs"]
    assert (entry["datatype"], entry["shape"], document["id"]) == (datatype, shape, "x")
    back = np.frombuffer(rest, dtype=dtype) if binary else np.asarray(entry["data"], dtype=dtype)
    np.testing.assert_array_equal(back.reshape(shape), array)


def test_text_outputs_as_json_and_as_length_prefixed_bytes():
    labels = np.array([b"cat", b"", "\u00e9l\u00e8ve".encode()], dtype=object)
    for binary in (False, True):
        body, headers = encode_response("m", InferRequest(None, {}, {"label": binary}), {"label": labels})
        document, rest = split_response(body, headers)
        assert document["outputs"][0]["datatype"] == "BYTES" and "id" not in document
        if binary:
            assert (
                rest == b"\x03\x00\x00\x00cat" + b"\x00\x00\x00\x00" + b"\x07\x00\x00\x00" + "\u00e9l\u00e8ve".encode()
            )
        else:
            assert document["outputs"][0]["data"] == ["cat", "", "\u00e9l\u00e8ve"]


@pytest.mark.parametrize(
    "body, header, message",
    [
        (b"[]", None, "expected a JSON object"),
        (b'{"inputs": []}', None, '"inputs"'),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": [100000, 100000], "datatype": "FP32"}]}', None, "at most"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}]}', None, "int8"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "neither"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [Infinity]}]}', None, "finite"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]}', None, "numbers"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "id": 3}', None, '"id"'),
        (ONE[:-1] + b', "id": "\\ud800"}', None, "\"id\" must be valid Unicode text; got '\\ud800'"),
        (
            ONE[:-1] + b', "parameters": {"binary_data_output": "yes"}}',
            None,
            "parameter 'binary_data_output' of the request must be true or false (a JSON boolean); got 'yes'",
        ),
        (
            ONE[:-1] + b', "outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}',
            None,
            "parameter 'binary_data' of output 'y' must be true or false (a JSON boolean); got 'false'",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], '
            b'"parameters": {"binary_data_size": 4}}]}',
            None,
            'both "data" and parameters.binary_data_size',
        ),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', "9999", "does not fit"),
        (ONE + b"xx", str(len(ONE)), "no input claims"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}',
            None,
            "exceeds",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}',
            None,
            "!= 2 elements",
        ),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["1", "2"]}]}', None, "found '1'"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": {}, "data": [1]}]}', None, "datatype {} is not served"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": [1], "data": [1]}]}', None, "is not served"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], ["2"]]}]}', None, "found '2'"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [true]}]}', None, "found True"),
        (
            b'{"inputs": [{"name": "ids", "shape": [2], "datatype": "INT64", "data": [1, 1.5]}]}',
            None,
            "input 'ids': \"data\" must hold int64 integers only; found 1.5",
        ),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [[2.0]]}]}', None, "found 2.0"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1e2]}]}', None, "int8 integers"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [null]}]}', None, "found None"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "JSON"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1' + b"0" * 5000 + b"]}]}",
            None,
            "JSON number too long",
        ),
    ],
)
def test_malformed_requests_are_input_errors_naming_the_problem(body, header, message):
    with pytest.raises(InputError) as refused:
        decode_request(body, header)
    assert message in str(refused.value), str(refused.value)


TENSOR = '{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}'


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('{"inputs": [{"name": "x", "shape": [2], "shape": [1], "datatype": "FP32", "data": [1]}]}', "shape"),
        ('{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a:b"], "data": [1]}]}', "data"),
        (f'{{"id": "a", "inputs": [{TENSOR}], "id": "b:c"}}', "id"),  # a colon in a string
        (f'{{"id": "\\u003a", "inputs": [{TENSOR}], "id": "b"}}', "id"),  # an escaped one
        (f'{{"id": "a", "inputs": [{TENSOR}], "id": "\\u003a"}}', "id"),  # the kept one's escape evens the count
        (f'{{"inputs": [{TENSOR}], "parameters": {{"p": {{"a:b": 1, "a:b": 2}}}}}}', "a:b"),
        (f'{{"inputs": [{TENSOR}], "outputs": [{{"name": "y", "name": "z"}}]}}', "name"),
    ],
)
def test_a_key_given_twice_in_one_object_of_the_request_is_refused_by_name(body, key):
    """JSON parsers keep one of the values silently: the request's meaning would be a guess."""
    with pytest.raises(InputError) as refused:
        decode_request(body.encode(), None)
    assert str(refused.value) == (
        f"the request names the key {key!r} twice in one JSON object: expected each key once "
        "(which value was meant would be a guess)"
    )


@pytest.mark.parametrize(
    "body",
    [
        f'{{"id": "a:b::c", "inputs": [{TENSOR}], "parameters": {{"k:1": "v:2", "n": [":", {{"x": ":"}}]}}}}',
        f'{{"id": "\\u003a", "inputs": [{TENSOR}]}}',  # an escaped colon, no key repeated
        f'{{"id": "\\\\u003a", "inputs": [{TENSOR}]}}',  # an escaped backslash, then "u003a"
        f'{{"inputs": [{TENSOR}, {{"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}}]}}',
    ],
)
def test_colons_and_escapes_in_a_requests_strings_are_not_mistaken_for_repeated_keys(body):
    assert "x" in decode_request(body.encode(), None).inputs


@pytest.mark.parametrize("datatype", ["BOOL", "BYTES", "BF16"])
def test_a_datatype_refused_as_an_input_is_not_among_those_the_answer_lists(datatype):
    """Every listed datatype is read; BOOL, which the server writes (a binary model's decision),
    is not: no served model takes booleans."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": datatype, "data": [True]}]}).encode()
    with pytest.raises(InputError) as refused:
        decode_request(body, None)
    listed = ast.literal_eval(str(refused.value).partition("expected one of ")[2])
    assert str(refused.value).startswith(f"input 'x': datatype {datatype!r} is not served as an input")
    assert datatype not in listed and "BOOL" not in listed
    for name in listed:
        decode_request(
            json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": name, "data": [1]}]}).encode(), None
        )


def test_an_output_requested_twice_is_refused_by_name():
    """Two entries naming one output were merged silently (the second's parameters winning)."""
    body = {"inputs": [json.loads(TENSOR)], "outputs": [{"name": "y"}, {"name": "z"}, {"name": "y"}]}
    with pytest.raises(InputError, match=r"requested output 'y' is given twice in \"outputs\": name each once"):
        decode_request(json.dumps(body).encode(), None)


def test_an_unknown_requested_output_names_the_outputs():
    with pytest.raises(InputError, match=r"no output\(s\) \['nope'\]: expected some of \['a'\]"):
        encode_response("m", InferRequest(None, {}, {"nope": False}), {"a": np.zeros(1)})


def run(coroutine, seconds: float = 20.0):
    with time_limit(seconds):
        return asyncio.run(coroutine)


@settings(max_examples=25)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=24), max_batch=st.integers(1, 16))
def test_each_request_gets_its_own_rows_back_in_batches_of_at_most_max_batch(sizes, max_batch):
    """Requests of mixed sizes share batches (never split; one larger than ``max_batch`` runs alone);
    each gets exactly its own rows of every output."""
    batches: list[list[int]] = []  # the requests in each batch, in order

    def model(batch: torch.Tensor) -> list[torch.Tensor]:
        batches.append(list(dict.fromkeys(batch[:, 0].long().tolist())))
        assert len(batch) <= max_batch or len(batches[-1]) == 1
        return [batch * 2, batch.sum(1, keepdim=True)]

    async def main():
        batcher = DynamicBatcher(model, max_batch, max_delay=0.01, max_queue=10_000)
        batcher.start()
        inputs = [torch.cat([torch.full((n, 1), i), torch.randn(n, 2)], 1).double() for i, n in enumerate(sizes)]
        answers = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, answers

    inputs, answers = run(main())
    for x, (doubled, summed) in zip(inputs, answers, strict=True):
        torch.testing.assert_close(doubled, x * 2, rtol=0, atol=0)
        torch.testing.assert_close(summed, x.sum(1, keepdim=True), rtol=0, atol=0)
    assert [i for batch in batches for i in batch] == list(range(len(sizes)))  # arrival order, each once
    if any(a + b <= max_batch for a, b in zip(sizes, sizes[1:])):
        assert len(batches) < len(sizes)  # all queued before the first batch: two that fit together shared one


@settings(max_examples=20)
@given(keys=st.lists(st.sampled_from([None, 1, 3]), min_size=1, max_size=16))
def test_requests_of_different_keys_never_share_a_batch_and_each_batch_runs_with_its_key(keys):
    """A sequence model's ``top_k`` is the key: a batch holds one key, runs ``run(batch, key)``
    (``run(batch)`` for None), and the requests keep their arrival order."""
    batches: list[tuple[object, list[int]]] = []

    def model(batch: torch.Tensor, *key: int) -> list[torch.Tensor]:
        batches.append((key[0] if key else None, batch[:, 0].long().tolist()))
        return [batch + (key[0] if key else 0)]

    async def main():
        batcher = DynamicBatcher(model, max_batch=8, max_delay=0.01, max_queue=100)
        batcher.start()
        answers = await asyncio.gather(
            *(batcher.submit(torch.full((1, 1), float(i)), key) for i, key in enumerate(keys))
        )
        await batcher.stop()
        return answers

    answers = run(main())
    assert [a[0].item() for a in answers] == [i + (k or 0) for i, k in enumerate(keys)]
    assert [i for _, rows in batches for i in rows] == list(range(len(keys)))
    for key, rows in batches:
        assert {keys[i] for i in rows} == {key}
    if len(keys) > 1 and all(k == keys[0] for k in keys) and len(keys) <= 8:
        assert len(batches) < len(keys)  # one key: they do share


class HeldModel:
    """A model that records each batch's size and holds its first batch until :meth:`release`."""

    def __init__(self):
        self.sizes: list[int] = []
        self.started, self.released = threading.Event(), threading.Event()

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        self.sizes.append(len(batch))
        self.started.set()
        if not self.released.wait(30):
            raise RuntimeError("never released")
        return [batch * 2]

    async def busy(self, batcher: DynamicBatcher) -> asyncio.Future:
        """Submit one sample and return once the model runs it (and holds it)."""
        first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 1)))
        while not self.started.is_set():
            await asyncio.sleep(0.001)
        return first


def test_a_lone_request_on_an_idle_model_runs_at_once_without_waiting_for_the_delay():
    """An hour of ``max_delay`` is never waited by requests that find the model idle (concurrency 1)."""
    sizes: list[int] = []

    def model(batch: torch.Tensor) -> list[torch.Tensor]:
        sizes.append(len(batch))
        return [batch + 1]

    async def main():
        batcher = DynamicBatcher(model, max_batch=32, max_delay=3600.0, max_queue=100)
        batcher.start()
        answers = [await batcher.submit(torch.full((1, 1), float(i))) for i in range(5)]  # one at a time
        await batcher.stop()
        return answers

    answers = run(main(), seconds=30)  # waiting for the delay once would take an hour
    assert sizes == [1] * 5 and [a[0].item() for a in answers] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_inline_serial_requests_run_on_the_event_loop_and_concurrent_ones_batch_on_a_worker():
    """With ``inline``, a lone request following a lone one runs on the loop's thread (no hand-off);
    the first of a series, and requests arriving together, run on a worker thread as a batch; an
    inline run's error is its request's own."""
    threads: list[tuple[str, int]] = []

    def model(batch: torch.Tensor) -> list[torch.Tensor]:
        threads.append((threading.current_thread().name, len(batch)))
        if bool((batch < 0).any()):
            raise ValueError("negative input")
        return [batch + 1]

    async def main():
        batcher = DynamicBatcher(model, max_batch=32, max_delay=3600.0, max_queue=100, inline=True)
        batcher.start()
        serial = [await batcher.submit(torch.full((1, 1), float(i))) for i in range(3)]
        together = await asyncio.gather(*(batcher.submit(torch.full((1, 1), float(i))) for i in range(3)))
        after = await batcher.submit(torch.zeros(1, 1))  # follows a batch of three: a worker's again
        with pytest.raises(ValueError, match="negative input"):
            await batcher.submit(-torch.ones(1, 1))
        last = await batcher.submit(torch.ones(1, 1))
        several = await batcher.submit(torch.ones(4, 1))  # lone, but several samples: never on the loop
        await batcher.stop()
        return [*serial, *together, after, last, several]

    answers = run(main(), seconds=30)
    loop_thread = threading.current_thread().name
    placed = [(name == loop_thread, size) for name, size in threads]
    assert placed == [(False, 1), (True, 1), (True, 1), (False, 3), (False, 1), (True, 1), (True, 1), (False, 4)]
    assert [a[0].flatten().tolist() for a in answers] == [
        [1.0],
        [2.0],
        [3.0],
        [1.0],
        [2.0],
        [3.0],
        [1.0],
        [2.0],
        [2.0] * 4,
    ]


@pytest.mark.parametrize(
    ("max_batch", "max_delay", "queued", "expected"), [(5, 3600.0, 5, [1, 5]), (32, 0.0, 7, [1, 7])]
)
def test_requests_arriving_while_the_model_is_busy_run_together(max_batch, max_delay, queued, expected):
    """While a batch runs, arrivals queue; when it ends they run as one batch: at once when
    ``max_batch`` samples wait (however long the delay), or after the delay with fewer."""
    model = HeldModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch=max_batch, max_delay=max_delay, max_queue=100)
        batcher.start()
        first = await model.busy(batcher)
        rest = [asyncio.ensure_future(batcher.submit(torch.full((1, 1), float(i)))) for i in range(queued)]
        await asyncio.sleep(0)
        waiting = batcher.queued
        model.released.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.stop()
        return waiting, answers

    waiting, answers = run(main(), seconds=30)
    assert waiting == queued and model.sizes == expected
    assert [a[0].item() for a in answers[1:]] == [2.0 * i for i in range(queued)]


@pytest.mark.parametrize("workers", [1, 2])
def test_while_a_batch_runs_requests_gather_and_a_full_batch_starts_on_a_free_worker(workers):
    """A lone request runs at once only on an idle model; while a batch runs, later requests gather
    (here for up to an hour) until ``max_batch`` samples wait, then start on a free worker, if any."""
    model = HeldModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch=2, max_delay=3600.0, max_queue=100, workers=workers)
        batcher.start()
        first = await model.busy(batcher)  # the model was idle: it runs at once, alone
        second = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
        await asyncio.sleep(0.05)
        gathered = (len(model.sizes), batcher.queued)  # a free worker does not take it alone
        third = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))  # max_batch samples wait now
        for _ in range(2000):  # until the second batch starts, or 2 s
            if len(model.sizes) == 2:
                break
            await asyncio.sleep(0.001)
        started = (len(model.sizes), batcher.queued)
        model.released.set()
        answers = await asyncio.gather(first, second, third)
        await batcher.stop()
        return gathered, started, answers

    gathered, started, answers = run(main(), seconds=30)
    assert gathered == (1, 1)
    assert started == {1: (1, 2), 2: (2, 0)}[workers]  # one worker: the pair waits for the first batch
    assert model.sizes == [1, 2] and [a[0].tolist() for a in answers] == [[[0.0]], [[2.0]], [[2.0]]]


def test_the_default_workers_are_the_cores_over_torchs_threads_and_one_for_a_fast_model():
    from trainfer.server.batching import COMPUTE_BOUND, default_workers

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [default_workers(), default_workers(COMPUTE_BOUND), default_workers(COMPUTE_BOUND / 2)]
        torch.set_num_threads(10_000)
        many = default_workers()
    finally:
        torch.set_num_threads(saved)
    cores = len(os.sched_getaffinity(0))
    assert one == [cores, cores, 1] and many == 1


def test_a_checked_model_knows_its_one_sample_forward_time():
    from trainfer import Predictor
    from trainfer.server.model import ServedModel

    served = ServedModel("linear", Predictor(torch.nn.Linear(4, 3).eval(), preprocess={"input_shape": [4]}))
    assert served.forward_seconds is None
    served.check()
    assert 0 < served.forward_seconds < 10


def test_a_full_queue_refuses_at_once_and_a_cancelled_request_is_never_computed():
    model = HeldModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch=100, max_delay=0.0, max_queue=3)
        batcher.start()
        busy = await model.busy(batcher)
        first = asyncio.ensure_future(batcher.submit(torch.zeros(2, 1)))
        gone = asyncio.ensure_future(batcher.submit(torch.ones(1, 1)))
        await asyncio.sleep(0)
        assert batcher.queued == 3
        with pytest.raises(Overloaded):
            await batcher.submit(torch.zeros(1, 1))
        gone.cancel()
        model.released.set()
        await busy
        rows = await first
        await batcher.stop()
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.submit(torch.zeros(1, 1))
        return rows, batcher.queued

    rows, left = run(main())
    assert rows[0].shape == (2, 1) and model.sizes == [1, 2] and left == 0


def test_a_failing_batch_runs_again_request_by_request_and_only_the_bad_request_fails():
    sizes: list[int] = []

    def model(batch: torch.Tensor) -> list[torch.Tensor]:
        sizes.append(len(batch))
        if (batch < 0).any():
            raise RuntimeError("broken")
        return [batch * 2]

    async def main():
        batcher = DynamicBatcher(model, max_batch=8, max_delay=0.05, max_queue=100)
        batcher.start()
        results = await asyncio.gather(
            batcher.submit(-torch.ones(1, 1)), batcher.submit(torch.full((2, 1), 3.0)), return_exceptions=True
        )
        after = await batcher.submit(torch.ones(1, 1))
        await batcher.stop()
        return results, after

    (bad, good), after = run(main())
    assert sizes == [3, 1, 2, 1]  # the batch of both, each alone, then the next request
    assert isinstance(bad, RuntimeError) and str(bad) == "broken"
    assert good[0].tolist() == [[6.0], [6.0]] and after[0].item() == 2.0


class TwoHeads(torch.nn.Module):
    """A classification head (probabilities) and a regression head on 8-feature rows."""

    def __init__(self):
        super().__init__()
        self.body, self.digit, self.size = torch.nn.Linear(8, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)

    def forward(self, x):
        h = self.body(x).relu()
        return {"digit": self.digit(h).softmax(1), "size": self.size(h)}


def test_a_request_overflowing_once_normalised_fails_alone_with_its_own_message_and_its_batch_mates_are_served():
    from trainfer import Predictor
    from trainfer.errors import NonFiniteError
    from trainfer.server.model import ServedModel

    torch.manual_seed(0)
    served = ServedModel("digits", Predictor(torch.nn.Linear(4, 3).eval(), preprocess={"input_shape": [4]}))
    served.check()
    good = np.random.default_rng(0).random((2, 4))
    huge = np.full((1, 4), 1e300)  # finite as float64, inf once cast to the model's float32
    sizes: list[int] = []

    def compute(batch: torch.Tensor) -> list[torch.Tensor]:
        sizes.append(len(batch))
        return served.compute(batch)

    async def main():
        batcher = DynamicBatcher(compute, max_batch=8, max_delay=0.05, max_queue=100)
        batcher.start()
        answers = await asyncio.gather(
            batcher.submit(served.prepare(good)), batcher.submit(served.prepare(huge)), return_exceptions=True
        )
        await batcher.stop()
        return answers

    rows, error = run(main())
    assert sizes == [3, 2, 1]  # together, then each request alone
    assert isinstance(error, NonFiniteError) and "input sample(s) [0] overflow float32" in str(error)
    expected = served.predictor.predict(good)
    assert served.tensors(rows)["index"].tolist() == [r.index for r in expected]
    np.testing.assert_allclose(served.tensors(rows)["probabilities"].max(1), [r.probability for r in expected], 1e-6)


class NonFiniteRows(torch.nn.Module):
    """Two regression values a row, ``1 / x0`` and ``log(x1)``: +inf, -inf or NaN where x0 or x1 is 0 or negative."""

    def forward(self, x):
        return torch.stack([1 / x[:, 0], x[:, 1].log()], 1)


def test_a_batch_whose_scores_hold_nan_or_inf_raises_naming_those_samples_as_the_predictor_does():
    from trainfer import Predictor
    from trainfer.errors import NonFiniteError
    from trainfer.server.model import ServedModel

    predictor = Predictor(NonFiniteRows(), task="regression", preprocess={"input_shape": [2]})
    served = ServedModel("rows", predictor)
    served.check()
    rows = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, -1.0], [2.0, 3.0]])  # fine, +inf, -inf, NaN, fine
    with pytest.raises(NonFiniteError) as served_error:
        served.compute(served.prepare(rows))
    with pytest.raises(NonFiniteError) as predicted:
        predictor.predict(rows)
    assert "the model's output for input sample(s) [1, 2, 3] holds NaN or inf" in str(served_error.value)
    assert str(served_error.value) == str(predicted.value)
    assert served.tensors(served.compute(served.prepare(rows[[0, 4]])))["values"].shape == (2, 2)


def test_tied_scores_rank_the_class_the_predictor_names():
    """Ten equal logits: the served index is the one ``Predictor.predict`` gives (``topk``'s choice
    among ties, not necessarily the first class), so both answers name one class."""
    from trainfer import Predictor
    from trainfer.server.model import ServedModel

    model = torch.nn.Linear(4, 10)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    predictor = Predictor(model.eval(), preprocess={"input_shape": [4]}, labels=[f"c{i}" for i in range(10)])
    served = ServedModel("ties", predictor)
    served.check()
    x = np.random.default_rng(0).random((3, 4))
    tensors = served.tensors(served.compute(served.prepare(x)))
    expected = predictor.predict(x)
    assert tensors["index"].tolist() == [r.index for r in expected]
    assert tensors["label"].tolist() == [r.label.encode() for r in expected]


def test_a_served_model_set_to_train_between_batches_is_still_served_in_eval():
    from trainfer import Predictor
    from trainfer.server.model import ServedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    model[1].running_mean.fill_(2.0), model[1].running_var.fill_(4.0)  # eval's statistics differ from a batch's
    served = ServedModel("bn", Predictor(model, preprocess={"input_shape": [4]}))
    served.check()
    batch = served.prepare(np.random.default_rng(0).random((3, 4)))
    before = served.compute(batch)
    model[1].training = True  # the flag alone, as a caller's code might set it
    after = served.compute(batch)
    assert model[1].training
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_multi_head_and_regression_outputs_are_the_predictors_results():
    from trainfer import Predictor
    from trainfer.server.model import ServedModel

    torch.manual_seed(0)
    predictor = Predictor(
        TwoHeads().eval(), heads={"digit": "classification", "size": "regression"}, preprocess={"input_shape": [8]}
    )
    served = ServedModel("two", predictor)
    served.check()
    assert {name: dtype for name, (dtype, _) in served.outputs.items()} == {
        "digit.probabilities": "FP32",
        "digit.index": "INT64",
        "digit.label": "BYTES",
        "size.values": "FP32",
    }
    x = torch.randn(5, 8)
    tensors = served.tensors(served.compute(served.prepare(x)))
    expected = predictor.predict(x)
    np.testing.assert_allclose(tensors["size.values"], [r["size"].values for r in expected], atol=1e-6, rtol=0)
    assert tensors["digit.index"].tolist() == [r["digit"].index for r in expected]
    assert [label.decode() for label in tensors["digit.label"]] == [r["digit"].label for r in expected]
    np.testing.assert_allclose(
        tensors["digit.probabilities"].max(1), [r["digit"].probability for r in expected], atol=1e-6
    )


@pytest.mark.parametrize("labels", [["not 7", "7"], None])
def test_a_binary_models_outputs_label_each_decision_as_a_classifiers_label_its_class(labels):
    """``/infer`` of a binary model had no ``label`` though ``/predict`` answers one: it names the
    decision with the bundle's labels, ``"0"``/``"1"`` without (a classifier's unlabelled names)."""
    from trainfer import Predictor
    from trainfer.server.model import ServedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1), torch.nn.Sigmoid()).eval()
    predictor = Predictor(model, task="binary", labels=labels, preprocess={"input_shape": [8]})
    served = ServedModel("yesno", predictor)
    served.check()
    assert {name: dtype for name, (dtype, _) in served.outputs.items()} == {
        "probability": "FP32",
        "decision": "BOOL",
        "label": "BYTES",
    }
    x = torch.randn(16, 8)
    tensors = served.tensors(served.compute(served.prepare(x)))
    expected = predictor.predict(x)
    assert tensors["decision"].tolist() == [r.decision for r in expected] and len(set(tensors["decision"])) == 2
    names = labels or ["0", "1"]
    assert [label.decode() for label in tensors["label"]] == [names[r.decision] for r in expected]


async def asgi_request(
    app,
    path: str,
    method: str = "GET",
    body: bytes = b"",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    receive=None,
    root_path: str = "",
) -> tuple[int, dict[str, str], bytes]:
    """A request through the ASGI app itself (no server, no socket); ``path`` may end in ``?query``;
    ``receive``: the client's side; ``root_path``: where the app is mounted (``path`` then starts with
    it, as ASGI servers send it)."""
    sent: list[dict] = []

    async def whole_body():
        return {"type": "http.request", "body": body, "more_body": False}

    receive = receive or whole_body

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path.partition("?")[0], "raw_path": path.partition("?")[0].encode(),
        "query_string": path.partition("?")[2].encode(), "root_path": root_path, "headers": list(headers),
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_not_ready_until_the_models_are_loaded_and_checked():
    pytest.importorskip("fastapi")
    from trainfer.server.app import ServerSettings, create_app

    readied: list[bool] = []
    app = create_app(
        ServerSettings(bundles={"digits": str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")}),
        on_ready=lambda: readied.append(app.state.server.ready),
    )

    async def main():
        before = [await asgi_request(app, path) for path in ("/v2/health/ready", "/v2/models/digits/ready")]
        assert not readied
        live = await asgi_request(app, "/v2/health/live")
        async with app.router.lifespan_context(app):
            for _ in range(600):
                if (await asgi_request(app, "/v2/health/ready"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            after = [await asgi_request(app, path) for path in ("/v2/health/ready", "/v2/models/digits/ready")]
            metadata = json.loads((await asgi_request(app, "/v2/models/digits"))[2])
        return before, live, after, metadata

    before, live, after, metadata = run(main(), seconds=60)
    assert live[0] == 200 and [status for status, _, _ in before] == [503, 503]
    assert before[1][1]["retry-after"] == "1" and "still loading" in json.loads(before[1][2])["error"]
    assert [status for status, _, _ in after] == [200, 200] and readied == [True]  # once, when loaded
    assert metadata["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array(["2024-01-01"], dtype="datetime64[D]"), "expected real numbers"),
        (np.zeros((0, 1, 8, 8), dtype=np.float32), "holds no samples"),
        (np.float32(1.0), "0-d array"),
    ],
)
def test_an_uploaded_npy_gets_the_checks_of_a_npy_file(array, message):
    """Dates, no samples, one number: the same InputError as `trainfer predict` gives for the file."""
    import io

    from trainfer.errors import InputError
    from trainfer.serve.preprocess import PreprocessSpec
    from trainfer.server.uploads import _npy

    data = io.BytesIO()
    np.save(data, array)
    with pytest.raises(InputError, match=message):
        _npy(data.getvalue(), "x.npy", PreprocessSpec(input_shape=(1, 8, 8)))


def test_an_uploaded_npy_whose_header_claims_more_data_than_it_holds_is_refused_before_allocating():
    """A forged header (10**11 samples of 8x8 float32, 256 bytes sent) is a 400, not a MemoryError."""
    import io

    from trainfer.errors import InputError
    from trainfer.serve.preprocess import PreprocessSpec
    from trainfer.server.uploads import read_upload

    data = io.BytesIO()
    np.lib.format.write_array_header_1_0(data, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 1, 8, 8)})
    data.write(b"\0" * 256)
    with pytest.raises(InputError, match=r"'x\.npy' declares shape \(100000000000, 1, 8, 8\) .* holds 256 bytes"):
        read_upload(data.getvalue(), "x.npy", "application/octet-stream", PreprocessSpec(input_shape=(1, 8, 8)))


def test_the_batch_thread_runs_with_the_torch_threads_of_the_batchers_creator():
    """OpenMP keeps a thread count per thread: the worker thread must not fall back to its default."""
    omp_threads = getattr(ctypes.CDLL(None), "omp_get_max_threads", None)
    if omp_threads is None:
        pytest.skip("torch's OpenMP runtime is not visible here")
    seen: list[int] = []

    def model(batch: torch.Tensor) -> list[torch.Tensor]:
        seen.append(omp_threads())
        return [batch]

    async def main():
        batcher = DynamicBatcher(model, max_batch=4, max_delay=0.0, max_queue=10)
        batcher.start()
        await batcher.submit(torch.zeros(1, 1))
        await batcher.stop()

    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(omp_threads()))
    thread.start()
    thread.join()
    saved, wanted = torch.get_num_threads(), fresh[0] + 1  # not what a new thread starts with
    torch.set_num_threads(wanted)
    try:
        run(main())
    finally:
        torch.set_num_threads(saved)
    assert seen == [wanted]


def test_a_model_served_compiled_is_explained_on_the_bundles_torch_model():
    from trainfer import Predictor
    from trainfer.server.model import load_model

    bundle = Path(__file__).parent / "fixtures" / "digits_deploy_v2"
    served = load_model("digits", bundle, runtime="torch", trust_factory=False, max_batch=4)
    assert not isinstance(served.predictor.model, torch.nn.Module)  # a CompiledModel: no gradients through it
    sample = torch.rand(1, *served.input_shape, generator=torch.Generator().manual_seed(0))
    explained = served.explain(sample)
    expected = Predictor.load(bundle).explain(sample)
    assert explained.values.abs().sum() > 0
    torch.testing.assert_close(explained.values, expected.values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"not an image", "x.png", r"cannot read image 'x\.png': expected one of the formats BMP, GIF, JPEG, PNG, "),
        (b"not an array", "a.npy", r"cannot read 'a\.npy' as a \.npy array: it does not start with the \.npy magic"),
    ],
)
def test_an_unreadable_upload_is_named_by_its_file_name_and_what_failed(data, name, message):
    """The refusal names the upload (never an object's repr) and the format its name claims."""
    from trainfer.errors import InputError
    from trainfer.serve.preprocess import PreprocessSpec
    from trainfer.server.uploads import read_upload

    with pytest.raises(InputError, match=message) as refused:
        read_upload(data, name, "application/octet-stream", PreprocessSpec(input_shape=(1, 8, 8)))
    assert "object at" not in str(refused.value)


def test_a_bug_is_answered_500_in_one_line_and_its_traceback_logged_once_on_infer_and_other_routes(caplog):
    """An exception that is not a request's mistake, in the inference hot path or a FastAPI route."""
    pytest.importorskip("fastapi")
    from trainfer.server.app import ServerSettings, create_app
    from trainfer.server.error_answers import INTERNAL_ERROR

    app = create_app(ServerSettings(bundles={"digits": str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")}))
    request = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()

    def broken(*args):
        raise RuntimeError("boom")

    async def main():
        async with app.router.lifespan_context(app):
            while (await asgi_request(app, "/v2/health/ready"))[0] != 200:
                await asyncio.sleep(0.05)
            ok = await asgi_request(app, "/v2/models/digits/infer", "POST", request)
            server = app.state.server
            server.models["digits"].tensors = broken
            server.metrics.render = broken
            return ok, [
                await asgi_request(app, "/v2/models/digits/infer", "POST", request),
                await asgi_request(app, "/metrics"),
            ]

    with caplog.at_level("ERROR", logger="trainfer.server"):
        ok, bugs = run(main(), seconds=60)
    assert ok[0] == 200 and json.loads(ok[2])["outputs"]
    assert [(status, json.loads(body)) for status, _, body in bugs] == [(500, {"error": INTERNAL_ERROR})] * 2
    tracebacks = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(tracebacks) == 2, [r.getMessage() for r in tracebacks]  # one per request


async def _ready(app) -> None:
    while (await asgi_request(app, "/v2/health/ready"))[0] != 200:
        await asyncio.sleep(0.05)


def _digits_app(**settings):
    from trainfer.server.app import ServerSettings, create_app

    bundle = str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")
    return create_app(ServerSettings(bundles={"digits": bundle}, **settings))


#: Declared shapes numpy cannot build, or only just can: huge dimensions beside a 0 (an empty tensor whose
#: bytes numpy still counts: ``[2**61, 0, 8, 8]``), and around numpy's 32 (1.26) and 64 (2) dimensions.
HUGE_DIMENSION = st.one_of(st.sampled_from([0, 1, 8, 2**61, 2**63 - 1]), st.integers(0, 2**64 - 1))
ODD_SHAPES = st.one_of(
    st.lists(HUGE_DIMENSION, max_size=6),
    st.lists(st.sampled_from([0, 1, 2]), min_size=28, max_size=70),
    st.integers(65, 5000).map(lambda dimensions: [1] * dimensions),
)


def _shape_request(shape: list[int], binary: bool) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    """An FP32 ``input`` of ``shape`` holding its elements when a few (else none), as JSON or binary data."""
    count = math.prod(shape)
    values = [0.5] * count if count <= 64 else []
    tensor = {"name": "input", "shape": shape, "datatype": "FP32"}
    if not binary:
        return json.dumps({"inputs": [{**tensor, "data": values}]}).encode(), ()
    blob = np.asarray(values, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, ((b"inference-header-content-length", str(len(header)).encode()),)


@settings(max_examples=200)
@given(shape=ODD_SHAPES, binary=st.booleans())
def test_a_shape_no_array_can_take_is_an_input_error_when_decoded(shape, binary):
    """``[2**61, 0, 8, 8]`` and 65 dimensions raised numpy's ValueError (a 500): refused with the shape check."""
    body, headers = _shape_request(shape, binary)
    try:
        decoded = decode_request(body, dict(headers).get(b"inference-header-content-length", b"").decode() or None)
    except InputError as error:
        assert "\n" not in str(error)
    else:
        assert decoded.inputs["input"].shape == tuple(shape)


@pytest.mark.parametrize(
    "shape, error",
    [
        ([2**61, 0, 8, 8], "input 'input' declares shape (2305843009213693952, 0, 8, 8): its non-zero dimensions"),
        ([1] * 33, "input 'input' declares a shape of 33 dimensions: expected at most 32 (numpy's limit)"),
        ([1] * 65, "input 'input' declares a shape of 65 dimensions: expected at most 32 (numpy's limit)"),
        ([2] * 100_000, "input 'input' declares a shape of 100000 dimensions: expected at most 32"),
    ],
)
def test_a_shape_no_array_can_take_is_refused_in_one_line(shape, error):
    for binary in (False, True):
        body, headers = _shape_request(shape, binary)
        with pytest.raises(InputError, match=re.escape(error)):
            decode_request(body, dict(headers).get(b"inference-header-content-length", b"").decode() or None)


@settings(max_examples=4, deadline=None)
@given(cases=st.lists(st.tuples(ODD_SHAPES, st.booleans()), min_size=8, max_size=8))
def test_infer_answers_odd_shapes_with_a_400_never_a_500(cases):
    pytest.importorskip("fastapi")
    app = _digits_app()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return [
                await asgi_request(app, "/v2/models/digits/infer", "POST", *_shape_request(shape, binary))
                for shape, binary in cases
            ]

    for (shape, _), (status, _, body) in zip(cases, run(main(), seconds=60)):
        assert status in (200, 400), (shape[:8], len(shape), status, body[:200])


def test_the_requests_binary_data_output_is_the_default_of_every_named_output():
    """Attacker round 10 F6: outputs named without their own ``binary_data`` came back as JSON whatever the
    request's ``binary_data_output`` said, which the binary tensor extension makes their default."""
    pytest.importorskip("fastapi")
    app = _digits_app()
    tensor = {"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 128}
    named = [{"name": "index"}, {"name": "label", "parameters": {}}, {"name": "probabilities"}]
    requests = [
        {"inputs": [tensor], "outputs": named, "parameters": {"binary_data_output": True}},
        {"inputs": [tensor], "outputs": [*named[:2], {"name": "probabilities", "parameters": {"binary_data": False}}]}
        | {"parameters": {"binary_data_output": True}},
        {"inputs": [tensor], "outputs": [{"name": "index", "parameters": {"binary_data": True}}, named[1]]},
    ]

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return [
                await asgi_request(app, "/v2/models/digits/infer", "POST", json.dumps(r).encode()) for r in requests
            ]

    binary = []
    for status, headers, body in run(main(), seconds=60):
        assert status == 200, body
        document, _ = split_response(body, headers)
        binary.append(
            {entry["name"]: "binary_data_size" in entry.get("parameters", {}) for entry in document["outputs"]}
        )
    assert binary == [
        {"index": True, "label": True, "probabilities": True},
        {"index": True, "label": True, "probabilities": False},  # an output's own binary_data overrides it
        {"index": True, "label": False},  # without the request's flag: JSON unless asked
    ]


def test_predict_refuses_a_top_k_above_an_unlabelled_models_classes_before_reading_the_body(tmp_path):
    """The class count comes from the load-time check: no labels needed, no body read, no forward run."""
    pytest.importorskip("fastapi")
    from serving_models import save_bundle

    from trainfer.server.app import ServerSettings, create_app

    bundle = save_bundle(tmp_path / "tiny", seed=0, outputs=3)  # no labels
    app = create_app(ServerSettings(bundles={"tiny": str(bundle)}))

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            ranked = await asgi_request(app, "/v2/models/tiny/predict?top_k=3&filename=x.npy", "POST", _npy(3))
            refused = await asgi_request(app, "/v2/models/tiny/predict?top_k=4", "POST", b"not read")
            return ranked, refused

    (status, _, body), (refused, _, error) = run(main(), seconds=60)
    assert status == 200 and all(len(json.loads(line)["top_k"]) == 3 for line in body.splitlines())
    assert (refused, json.loads(error)) == (400, {"error": "top_k 4 is more than the 3 classes: give at most 3"})


def test_predict_decides_at_the_requests_threshold_checked_as_the_command_lines(tmp_path):
    """``threshold`` was ignored (the answer said 0.5): a binary model decides at the request's threshold,
    which is read and bounded as ``trainfer predict --threshold`` reads it, before the body is read."""
    pytest.importorskip("fastapi")
    from serving_models import save_bundle

    from trainfer import Predictor
    from trainfer.server.app import ServerSettings, create_app

    bundle = save_bundle(tmp_path / "yesno", seed=1, task="binary", outputs=1, final="sigmoid")
    app = create_app(ServerSettings(bundles={"yesno": str(bundle)}))
    queries = ["threshold=0.3", "", "threshold=2", "threshold=nan", "threshold=1_0"]

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return [await asgi_request(app, f"/v2/models/yesno/predict?{q}", "POST", _npy(6)) for q in queries]

    (status, _, body), (default, _, _), *refused = run(main(), seconds=60)
    expected = Predictor.load(bundle, threshold=0.3).predict(np.load(io.BytesIO(_npy(6))))
    answers = [json.loads(line) for line in body.splitlines()]
    assert status == default == 200 and [a["threshold"] for a in answers] == [0.3] * 6
    assert [a["decision"] for a in answers] == [r.decision for r in expected]
    assert [(code, json.loads(error)["error"]) for code, _, error in refused] == [
        (400, "threshold must be a number in [0, 1]; got 2.0"),
        (400, "threshold must be a number in [0, 1]; got nan"),
        (400, "query parameter threshold='1_0': expected a number written in ASCII (digits 0-9, an optional sign, "
         "point and exponent; no underscores)"),
    ]  # fmt: skip


def _npy(samples: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).random((samples, 1, 8, 8), dtype=np.float32))
    return buffer.getvalue()


def test_a_sample_at_fault_in_a_request_past_max_batch_is_named_by_its_number_in_the_request():
    pytest.importorskip("fastapi")
    app = _digits_app(max_batch=4)
    data = np.random.default_rng(0).random((10, 1, 8, 8))
    data[6] = 1e300  # finite in FP64, inf once cast to the model's float32: the third chunk's third sample
    request = json.dumps(
        {"inputs": [{"name": "input", "shape": list(data.shape), "datatype": "FP64", "data": data.ravel().tolist()}]}
    ).encode()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return await asgi_request(app, "/v2/models/digits/infer", "POST", request)

    status, _, body = run(main(), seconds=60)
    assert status == 400 and json.loads(body)["error"].startswith("input sample(s) [6] overflow float32")


def test_a_body_that_does_not_arrive_within_the_timeout_is_408_and_a_client_gone_mid_body_499_without_a_traceback(
    caplog,
):
    pytest.importorskip("fastapi")
    app = _digits_app(timeout=0.3)

    async def trickle():  # the first bytes, then nothing: a slow-body client
        if trickle.sent:
            await asyncio.sleep(3600)
        trickle.sent = True
        return {"type": "http.request", "body": b'{"inputs": [', "more_body": True}

    async def leave():  # the first bytes, then the client disconnects
        if leave.sent:
            return {"type": "http.disconnect"}
        leave.sent = True
        return {"type": "http.request", "body": b'{"inputs": [', "more_body": True}

    trickle.sent = leave.sent = False

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            slow = await asgi_request(app, "/v2/models/digits/infer", "POST", receive=trickle)
            gone = await asgi_request(app, "/v2/models/digits/predict", "POST", receive=leave)
            leave.sent = False
            gone_infer = await asgi_request(app, "/v2/models/digits/infer", "POST", receive=leave)
            metrics = (await asgi_request(app, "/metrics"))[2].decode()
        return slow, gone, gone_infer, metrics

    with caplog.at_level("INFO", logger="trainfer.server"):
        slow, gone, gone_infer, metrics = run(main(), seconds=60)
    assert slow[0] == 408 and "did not arrive within the request timeout of 0.3 s" in json.loads(slow[2])["error"]
    assert gone[0] == gone_infer[0] == 499
    assert 'endpoint="infer",status="499"' in metrics and 'endpoint="predict",status="499"' in metrics
    assert not [r for r in caplog.records if r.exc_info], "a client leaving is not a bug"


def test_explain_refuses_an_input_whose_scores_overflow_as_predict_does_never_a_heat_map_of_nulls():
    """Pixels of 1e38 overflow the digits fixture's scores: the explanation is a 400 with the very
    message of the prediction's (Predictor.explain checks the scores as predict does), not a 200
    whose heat map JSON holds nulls."""
    pytest.importorskip("fastapi")
    pytest.importorskip("captum")
    import io

    from trainfer.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(bundles={"digits": str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")}))
    upload = io.BytesIO()
    np.save(upload, np.full((1, 1, 8, 8), 1e38, np.float32))

    async def main():
        async with app.router.lifespan_context(app):
            while (await asgi_request(app, "/v2/health/ready"))[0] != 200:
                await asyncio.sleep(0.05)
            routes = ("predict", "explain")
            return [await asgi_request(app, f"/v2/models/digits/{r}", "POST", upload.getvalue()) for r in routes]

    answers = [(status, json.loads(body)) for status, _, body in run(main(), seconds=60)]
    assert [status for status, _ in answers] == [400, 400], answers
    assert "the model's output for input sample(s) [0] holds NaN or inf" in answers[0][1]["error"]
    assert answers[1][1]["error"] == answers[0][1]["error"]


def test_an_explanation_past_the_timeout_is_504_its_turn_waiters_too_and_the_turn_is_freed_when_its_thread_ends():
    """The first explanation's thread blocks: its request gets 504 at the timeout; the next one, sent
    after that 504 while the thread still runs, waits for its turn and gets 504 without being
    computed; once the thread ends the turn is free and an explanation is answered again."""
    pytest.importorskip("captum")
    import io

    app = _digits_app(timeout=1)
    server = app.state.server
    release, calls = threading.Event(), []
    upload = io.BytesIO()
    np.save(upload, np.zeros((1, 1, 8, 8), np.float32))

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            model = server.models["digits"]
            explain = model.explain

            def blocked(sample, target=None):
                calls.append(sample)
                release.wait(30)
                return explain(sample, target)

            model.explain = blocked
            path = "/v2/models/digits/explain"
            late = [await asgi_request(app, path, "POST", upload.getvalue()) for _ in range(2)]
            computed_while_late = len(calls)
            release.set()
            while server.explaining.locked():
                await asyncio.sleep(0.01)
            return late, computed_while_late, await asgi_request(app, path, "POST", upload.getvalue())

    late, computed_while_late, after = run(main(), seconds=60)
    assert [status for status, _, _ in late] == [504, 504]
    assert {json.loads(b)["error"] for _, _, b in late} == {"no answer within the request timeout of 1 s"}
    assert computed_while_late == 1  # the second never ran: the timed-out first one's thread kept the turn
    assert after[0] == 200 and len(json.loads(after[2])["heatmap"]) == 8


def test_past_max_requests_a_request_gets_a_json_503_with_retry_after_before_its_body_is_read_probes_excepted():
    pytest.importorskip("fastapi")
    app = _digits_app(max_requests=2, timeout=30)
    held = asyncio.Event()

    async def hold():  # a client whose body never comes: it holds one of the max_requests
        await held.wait()
        return {"type": "http.disconnect"}

    async def never():
        raise AssertionError("the body of a refused request is read")

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            holders = [asyncio.ensure_future(asgi_request(app, "/v2/models/digits/infer", "POST", receive=hold))]
            holders.append(asyncio.ensure_future(asgi_request(app, "/v2/models/digits/infer", "POST", receive=hold)))
            await asyncio.sleep(0.1)
            refused = await asgi_request(app, "/v2/models/digits/infer", "POST", receive=never)
            probe = await asgi_request(app, "/v2/health/live")
            metrics = await asgi_request(app, "/metrics")  # bodiless: never refused for the limit
            held.set()
            await asyncio.gather(*holders)
            after = await asgi_request(app, "/v2/models/digits")
        return refused, (probe, metrics), after

    refused, (probe, metrics), after = run(main(), seconds=60)
    assert refused[0] == 503 and refused[1]["retry-after"] == "1"
    assert json.loads(refused[2]) == {"error": "overloaded: 2 requests are being handled; retry later"}
    assert probe[0] == metrics[0] == after[0] == 200


def test_an_answer_that_cannot_be_sent_because_the_client_left_is_499_without_a_traceback(caplog):
    """uvicorn raises from ``send`` on a closed transport (a client that pipelined requests and left)."""
    pytest.importorskip("fastapi")
    app = _digits_app()
    request = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()

    async def closed(message):
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def receive():
        return {"type": "http.request", "body": request, "more_body": False}

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v2/models/digits/infer", "raw_path": b"/v2/models/digits/infer", "query_string": b"",
        "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            await app(scope, receive, closed)
            return (await asgi_request(app, "/metrics"))[2].decode()

    with caplog.at_level("INFO", logger="trainfer.server"):
        metrics = run(main(), seconds=60)
    assert 'endpoint="infer",status="499"' in metrics
    assert not [r for r in caplog.records if r.exc_info], "a client leaving is not a bug"


@pytest.mark.parametrize("key", [" " * 20, "x" * 15, "a-valid-key-but\n", "caf\u00e9-key-of-16-chars", "k" * 4097])
def test_server_settings_refuse_an_api_key_no_client_can_send_also_outside_the_cli(key):
    """create_app and the Ray Serve deployment take ServerSettings directly: the key rule is theirs too."""
    pytest.importorskip("fastapi")
    from trainfer.server.state import ServerSettings

    with pytest.raises(InputError, match="api_key must be a key of at least 16 visible ASCII characters"):
        ServerSettings(bundles={"m": "b"}, api_key=key)
    assert ServerSettings(bundles={"m": "b"}, api_key="k" * 16).api_key == "k" * 16
    assert ServerSettings(bundles={"m": "b"}, api_key="k" * 4096).api_key == "k" * 4096


def test_an_api_key_header_given_twice_is_refused_whichever_value_comes_first():
    """Only the first was read: a proxy reading the last one would have judged another key."""
    pytest.importorskip("fastapi")
    key, wrong = b"k" * 24, b"w" * 24
    app = _digits_app(api_key=key.decode())

    async def status(*keys: bytes) -> tuple[int, str]:
        answer = await asgi_request(app, "/v2/models", headers=tuple((b"x-api-key", k) for k in keys))
        return answer[0], json.loads(answer[2]).get("error", "")

    async def main() -> list[tuple[int, str]]:
        return [await status(*keys) for keys in ((key,), (key, key), (key, wrong), (wrong, key))]

    answers = run(main())
    assert answers[0] == (200, "")
    twice = (401, "header x-api-key given 2 times: send the API key once")
    assert answers[1:] == [twice] * 3


def test_an_app_mounted_under_a_prefix_answers_inference_below_it_as_its_other_routes():
    """A Ray Serve route prefix or a proxy's root path: the hot path matches the path below the mount point."""
    pytest.importorskip("fastapi")
    app = _digits_app()
    request = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            infer = await asgi_request(app, "/p/v2/models/digits/infer", "POST", request, root_path="/p")
            metadata = await asgi_request(app, "/p/v2/models/digits", root_path="/p")
        return infer, metadata

    infer, metadata = run(main(), seconds=60)
    assert infer[0] == metadata[0] == 200 and json.loads(infer[2])["model_name"] == "digits"


@pytest.mark.parametrize(("path", "status"), [("/no/such/route", 404), ("/v2/models/digits/infer", 405)])
def test_a_routing_error_answers_in_the_error_form(path, status):
    """No route, or a GET where only POST is served: ``{"error": one line}`` like every other refusal."""
    pytest.importorskip("fastapi")
    from trainfer.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(bundles={"digits": str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")}))
    got, _, body = run(asgi_request(app, path), seconds=30)
    assert got == status
    assert json.loads(body) == {"error": "Not Found" if status == 404 else "Method Not Allowed"}


def test_a_csv_upload_past_max_rows_is_refused_before_its_rows_are_read():
    from trainfer.serve.preprocess import PreprocessSpec
    from trainfer.server.uploads import read_upload

    data = b"x\n" + b"1\n" * 100_000
    with time_limit(20), pytest.raises(InputError, match="more than 10 rows"):
        read_upload(data, "big.csv", "text/csv", PreprocessSpec(), max_rows=10)
    assert len(read_upload(b"x\n1\n2\n", "ok.csv", "text/csv", PreprocessSpec(), max_rows=2)) == 2
    with pytest.raises(InputError, match=r"'img.csv' for this model: CSV rows are samples of shape \(F,\)"):
        read_upload(b"x\n1\n", "img.csv", "text/csv", PreprocessSpec(input_shape=(1, 8, 8)), max_rows=2)


def test_a_request_past_max_batch_runs_in_chunks_and_its_later_chunks_never_run_after_its_timeout():
    """The answer equals the whole request's; a timed-out request frees the model after its running chunk."""
    from types import SimpleNamespace

    from trainfer.server.state import HTTPError, Server, ServerSettings

    sizes: list[int] = []
    pause = [0.0]

    def run(batch):
        sizes.append(len(batch))
        threading.Event().wait(pause[0])
        return [batch * 2, [f"r{v:g}" for v in batch[:, 0].tolist()]]

    async def answer(timeout, batch):
        server = Server(ServerSettings(bundles={"m": "m"}, max_batch=4, timeout=timeout), on_fatal=print)
        server.models["m"] = SimpleNamespace(key=lambda top_k: None)
        server.batchers["m"] = batcher = DynamicBatcher(run, max_batch=4, max_delay=0.0, max_queue=100)
        batcher.start()
        try:
            return await server.bounded(server.run("m", batch))
        finally:
            await batcher.stop()

    batch = torch.rand(10, 3, generator=torch.Generator().manual_seed(0))
    with time_limit(30):
        scores, names = asyncio.run(answer(30.0, batch))
        assert sizes == [4, 4, 2] and torch.equal(scores, batch * 2)
        assert names == [f"r{v:g}" for v in batch[:, 0].tolist()]
        sizes.clear()
        pause[0] = 0.4
        with pytest.raises(HTTPError) as refused:
            asyncio.run(answer(0.6, batch))
    assert refused.value.status == 504 and 1 <= len(sizes) <= 2 and 2 not in sizes


def test_the_ready_line_names_the_runtime_served_and_why(tmp_path):
    from trainfer.serve import runtime as rt
    from trainfer.serve.runtime_record import save_record
    from trainfer.server.model import load_model

    fixture = Path(__file__).parent / "fixtures" / "digits_deploy_v2"
    plain = load_model("d", fixture, runtime=None, trust_factory=False, max_batch=4)
    assert plain.serving() == "torch, the bundle's PyTorch model"
    asked = load_model("d", fixture, runtime="torch", trust_factory=False, max_batch=4)
    assert asked.serving() == "torch/float32, runtime 'torch' asked for"
    bundle = shutil.copytree(fixture, tmp_path / "b")
    save_record(bundle, rt.compile(bundle, runtime="torch").record)
    recorded = load_model("d", bundle, runtime=None, trust_factory=False, max_batch=4)
    assert recorded.serving() == "torch/float32, recorded in runtime.json"


def test_explain_takes_the_class_or_output_to_explain_and_refuses_one_out_of_range():
    """``?target=K`` explains class K (the predicted one by default), as ``Predictor.explain(target=K)``;
    an index past the outputs is a 400 naming the range."""
    pytest.importorskip("fastapi")
    app = _digits_app()
    upload = io.BytesIO()
    np.save(upload, np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32))
    path = "/v2/models/digits/explain"

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return [
                await asgi_request(app, path + query, "POST", upload.getvalue())
                for query in ("?target=3", "?target=10")
            ]

    (status, _, body), (refused, _, message) = run(main())
    assert status == 200 and refused == 400, (body, message)
    model = app.state.server.models["digits"]
    expected = model.explain(np.load(io.BytesIO(upload.getvalue())), target=3).values[0].double().abs().sum(0)
    heat = torch.tensor(json.loads(body)["heatmap"], dtype=torch.float64)
    torch.testing.assert_close(heat, expected / expected.max(), rtol=1e-5, atol=1e-6)
    assert "target must index the 10 outputs (0..9); got 10" in json.loads(message)["error"]


def test_explain_flags_a_map_of_zeros_as_an_input_with_nothing_to_attribute():
    """Attacker round 13, F8: an input equal to the baseline (the mean image, zeros once normalised; this bundle
    has no mean: zeros) got a map of zeros, which serving.md said /explain never gives: ``all_zero`` says so."""
    pytest.importorskip("fastapi")
    app = _digits_app()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            assert app.state.server.models["digits"].predictor.preprocess_spec.mean is None  # zeros: the baseline
            uploads = [np.zeros((1, 1, 8, 8), np.float32), np.random.default_rng(0).random((1, 1, 8, 8), np.float32)]
            return [await asgi_request(app, "/v2/models/digits/explain", "POST", _npy_of(a)) for a in uploads]

    (status, _, at_mean), (other_status, _, other) = run(main())
    assert status == other_status == 200, (at_mean, other)
    answer, other_answer = json.loads(at_mean), json.loads(other)
    assert answer["all_zero"] is True and not np.any(answer["heatmap"])
    assert other_answer["all_zero"] is False and np.max(other_answer["heatmap"]) == 1.0


def _npy_of(array: np.ndarray) -> bytes:
    upload = io.BytesIO()
    np.save(upload, array)
    return upload.getvalue()


def test_workers_get_a_minute_to_answer_their_supervisors_health_check(monkeypatch):
    """uvicorn kills a worker that has not answered its supervisor's ping within 5 s (its default):
    workers still importing torch and loading their bundle on a busy machine were killed three in a
    row. ``serve --workers N`` gives them :data:`~trainfer.server.run.WORKER_HEALTH_CHECK_SECONDS`."""
    from trainfer.server import run
    from trainfer.server.state import ServerSettings

    configs = []
    monkeypatch.setattr(run, "check_address", lambda host, port: None)
    monkeypatch.setattr(run, "check_bundles", lambda settings: None)
    monkeypatch.setattr(run, "_log_access", lambda: None)  # process-wide logging switches: not in the tests' process
    monkeypatch.setattr(run, "supervise", configs.append)
    monkeypatch.delenv(run.SETTINGS_VARIABLE, raising=False)
    run.serve(ServerSettings(bundles={"m": "unused"}), workers=2)
    (config,) = configs
    assert run.WORKER_HEALTH_CHECK_SECONDS == 60 and config.timeout_worker_healthcheck == 60
    assert config.workers == 2


def test_decoding_a_sequence_models_answers_is_bounded_by_the_timeout_and_the_cores_beside_cheap_requests(
    tmp_path, monkeypatch
):
    """A CTC model's answers are decoded after its batch (a beam search per sample). That stage ran
    outside the request timeout, on the default thread pool: 8 heavy decodes made another client's
    one-row request answer 200 after 9.6 s under ``--timeout 0.5``. Now every request gets its answer
    or its 504 within the timeout, and at most one decode per core runs (here 2): the others, which
    timed out waiting for a turn, never start."""
    pytest.importorskip("fastapi")
    from test_sequence_generation import images

    import trainfer
    from trainfer.models.sequence import CTC_TOKENS, digit_string_crnn
    from trainfer.numerics import randomize_batchnorm
    from trainfer.server import state
    from trainfer.server.app import ServerSettings, create_app
    from trainfer.server.model import ServedModel

    crnn = randomize_batchnorm(digit_string_crnn(width=4), seed=3).eval()
    ctc = {"kind": "ctc", "blank": 0, "beam_width": 4}
    bundle = trainfer.save(crnn, tmp_path / "ctc", task="sequence", labels=list(CTC_TOKENS), decoder=ctc)
    monkeypatch.setattr(state, "usable_cores", lambda: 2)
    released, started, decode = threading.Event(), [], ServedModel.results

    def slow_for_top_k_2(self, rows, top_k, *threshold):  # the heavy requests' decoding, seconds past the timeout
        if top_k == 2:
            started.append(top_k)
            released.wait(5)
        return decode(self, rows, top_k, *threshold)

    monkeypatch.setattr(ServedModel, "results", slow_for_top_k_2)
    app = create_app(ServerSettings(bundles={"ctc": str(bundle)}, timeout=0.5))
    buffer = io.BytesIO()
    np.save(buffer, images(1).numpy())
    npy = buffer.getvalue()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            heavy = [
                asyncio.ensure_future(asgi_request(app, "/v2/models/ctc/predict?top_k=2&filename=a.npy", "POST", npy))
                for _ in range(8)
            ]
            while len(started) < 2:
                await asyncio.sleep(0.01)
            cheap = await asgi_request(app, "/v2/models/ctc/predict?filename=b.npy", "POST", npy)
            answers = await asyncio.gather(*heavy)
            decoding_at_the_end = len(started)
            released.set()
            return cheap, answers, decoding_at_the_end

    cheap, answers, decoded = run(main(), seconds=60)
    late = {"error": "no answer within the request timeout of 0.5 s"}
    assert (cheap[0], json.loads(cheap[2])) == (504, late)
    assert [(status, json.loads(body)) for status, _, body in answers] == [(504, late)] * 8
    assert decoded == 2


def test_a_predict_answer_is_built_off_the_event_loop_within_the_timeout(monkeypatch):
    """/predict's answer (typed results, records, JSON lines: 0.5-0.8 s for a 60,000-sample upload) was
    built on the event loop after the request timeout: a 200 past ``--timeout`` while health probes waited.
    Here building it blocks: a probe sent meanwhile is answered while it still blocks, and the request
    gets its 504 at the timeout."""
    pytest.importorskip("fastapi")
    from trainfer.server.model import ServedModel

    released, building, results = threading.Event(), [], ServedModel.results

    def blocked(self, rows, *settings):
        building.append(True)
        released.wait(10)
        building.append(False)
        return results(self, rows, *settings)

    monkeypatch.setattr(ServedModel, "results", blocked)
    app = _digits_app(timeout=2)
    upload = io.BytesIO()
    np.save(upload, np.zeros((3, 1, 8, 8), np.float32))

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            answer = asyncio.ensure_future(asgi_request(app, "/v2/models/digits/predict", "POST", upload.getvalue()))
            while not building:
                await asyncio.sleep(0.01)
            live = await asgi_request(app, "/v2/health/live")
            still_building = building[-1]
            answered = await answer
            released.set()
            return live, still_building, answered

    live, still_building, answered = run(main(), seconds=60)
    assert live[0] == 200 and still_building
    assert (answered[0], json.loads(answered[2])) == (504, {"error": "no answer within the request timeout of 2 s"})


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("predict?top_k=1&top_k=5", "query parameter(s) given more than once: 'top_k' 2 times; give each once"),
        ("explain?target=1&target=2", "query parameter(s) given more than once: 'target' 2 times; give each once"),
        ("predict?filename=a.npy&filename=b.npy", "'filename' 2 times"),
        *[("explain?target=" + given, f"query parameter target={shown!r}: expected a whole number written with")
          for given, shown in [("1_0", "1_0"), ("1.0", "1.0"), ("%2B1", "+1"), ("+1", " 1"), ("%201", " 1"),
                               ("-1", "-1"), ("%D9%A1", "\u0661"), ("1e1", "1e1"), ("", ""), ("9" * 19, "9" * 19)]],
        ("predict?top_k=3.0", "query parameter top_k='3.0': expected a whole number written with the digits 0-9 only"),
        ("predict?treshold=0.2&k=1", "query parameter(s) 'k', 'treshold' unknown here; this endpoint takes filename, "
                                     "top_k, threshold"),
        ("explain?top_k=3", "query parameter(s) 'top_k' unknown here; this endpoint takes filename, target"),
        ("predict?threshold=0.2", "threshold applies to binary models only; this model's task is classification: "
                                  "drop threshold"),
    ],
)  # fmt: skip
def test_a_query_parameter_given_twice_or_an_integer_not_in_plain_decimal_digits_is_a_400_naming_it(query, error):
    """``target=1_0`` was read as 10 and ``target=1&target=2`` as 2: every integer parameter is plain
    ASCII digits, every parameter given once, checked before the body is read."""
    pytest.importorskip("fastapi")
    app = _digits_app()

    async def main():
        async with app.router.lifespan_context(app):
            await _ready(app)
            return await asgi_request(app, f"/v2/models/digits/{query}", "POST", b"never read")

    status, _, body = run(main(), seconds=60)
    assert status == 400 and error in json.loads(body)["error"], body


def test_the_file_endpoints_document_their_query_parameters_as_integers_numbers_and_strings():
    pytest.importorskip("fastapi")
    paths = _digits_app().openapi()["paths"]
    for route, typed in (
        ("predict", {"filename": "string", "top_k": "integer", "threshold": "number"}),
        ("explain", {"filename": "string", "target": "integer"}),
    ):
        parameters = {p["name"]: p for p in paths[f"/v2/models/{{name}}/{route}"]["post"]["parameters"]}
        assert {name: p["in"] for name, p in parameters.items()} == {"name": "path", **dict.fromkeys(typed, "query")}
        assert {name: parameters[name]["schema"]["type"] for name in typed} == typed


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "é", "n" * 129, 7])
def test_a_model_name_a_url_path_cannot_carry_is_refused_by_the_settings(name):
    """The Python API's settings refuse what ``--names`` refuses (the Ray app builds them too)."""
    from trainfer.server.state import ServerSettings

    with pytest.raises(InputError, match="model name .*: expected 1 to 128 ASCII letters"):
        ServerSettings(bundles={name: str(Path(__file__).parent / "fixtures" / "digits_deploy_v2")})


def test_only_a_fast_model_whose_cost_does_not_depend_on_its_inputs_runs_requests_on_the_event_loop():
    """A generating model's cost depends on when its sequences end (up to ``max_length``), not on the
    random inputs timed at load: however fast those were, its lone requests stay on a worker thread."""
    from types import SimpleNamespace

    from trainfer.server.state import runs_inline

    assert runs_inline(SimpleNamespace(forward_seconds=2e-4, generates=False))
    assert not runs_inline(SimpleNamespace(forward_seconds=2e-4, generates=True))
    assert not runs_inline(SimpleNamespace(forward_seconds=2e-3, generates=False))
    assert not runs_inline(SimpleNamespace(forward_seconds=None, generates=False))
