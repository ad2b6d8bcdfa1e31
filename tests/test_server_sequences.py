"""``trainfer serve`` for sequence bundles: an encoder-decoder and a CTC recogniser in a real server.

``/predict`` must give ``trainfer predict --format jsonl``'s records, ``/infer`` the decoded text,
tokens and scores as tensors (Triton's client), the metadata must list every output, and requests
decoded together in one batch must get what each gets alone. Also here: ``/explain`` called from two
threads at once answers what it answers one call at a time.
"""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from server_process import get, post, running_server
from serving_models import save_bundle
from test_sequence_generation import LABELS, SETTINGS, images, tiny_model

import trainfer
from trainfer import Predictor
from trainfer.cli.predict import gather_inputs, predictions, write_results
from trainfer.models.sequence import CTC_TOKENS, digit_string_crnn
from trainfer.numerics import randomize_batchnorm

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # one server subprocess for the module

#: Scores are sums of float32 log-probabilities of magnitude ~10: rounding with the batch composition.
ATOL = 1e-5
CTC = {"kind": "ctc", "blank": 0, "beam_width": 4}
DECODED = {"text": "BYTES", "tokens": "INT64", "lengths": "INT64", "score": "FP64"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequences")
    x = images(2)
    trainfer.save(tiny_model(), root / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=x)
    torch.manual_seed(3)
    crnn = randomize_batchnorm(digit_string_crnn(width=4), seed=3).eval()
    trainfer.save(crnn, root / "ctc", task="sequence", labels=list(CTC_TOKENS), decoder=CTC, example_inputs=x)
    save_bundle(root / "tiny", seed=0, labels=["cat", "dog", "eel"])
    return root


@pytest.fixture(scope="module")
def server(bundles):
    names = [str(bundles / n) for n in ("s2s", "ctc", "tiny")]
    with running_server(*names, "--max-batch", "8", "--max-delay-ms", "50") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.address, network_timeout=120.0, connection_timeout=60.0)
    yield client
    client.close()


def infer(client, model: str, x: np.ndarray, binary: bool = True):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return client.infer(model, [tensor])


def decoded(response) -> list[dict]:
    """The text, tokens and score records a response's sequence tensors describe."""
    texts, tokens, lengths = (response.as_numpy(n) for n in ("text", "tokens", "lengths"))
    rows = []
    for text, ids, n, score in zip(texts, tokens, lengths, response.as_numpy("score"), strict=True):
        assert (ids[n:] == -1).all()
        rows.append({"text": text.decode(), "tokens": ids[:n].tolist(), "score": float(score)})
    return rows


def summary(results) -> list[dict]:
    return [{"text": r.text, "tokens": r.tokens, "score": r.score} for r in results]


def test_metadata_lists_every_decoded_output_and_the_decoder(client):
    s2s = client.get_model_metadata("s2s")
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in s2s["outputs"]}
    expected = {name: (datatype, [-1]) for name, datatype in DECODED.items()}
    assert outputs == {**expected, "tokens": ("INT64", [-1, -1]), "finished": ("BOOL", [-1])}
    assert s2s["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 64]}]
    assert s2s["parameters"]["task"] == "sequence" and s2s["parameters"]["decoder"]["beam_width"] == 3
    ctc = {o["name"]: (o["datatype"], o["shape"]) for o in client.get_model_metadata("ctc")["outputs"]}
    assert ctc == {**expected, "tokens": ("INT64", [-1, -1]), "values": ("FP32", [-1, 32, 11])}


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_infer_returns_the_decoded_sequences_of_predictor_predict(client, bundles, binary):
    x = 3 * images(3, seed=5).numpy()
    for name in ("s2s", "ctc"):
        response = infer(client, name, x, binary)
        expected = Predictor.load(bundles / name).predict(x)
        assert_results_close(decoded(response), summary(expected), atol=ATOL)
        metadata = client.get_model_metadata(name)["outputs"]
        assert {o["name"] for o in metadata} == {o["name"] for o in response.get_response()["outputs"]}
    assert response.as_numpy("finished") is None  # the CTC model's outputs: no "finished"
    s2s = infer(client, "s2s", x, binary)
    assert s2s.as_numpy("finished").tolist() == [r.finished for r in Predictor.load(bundles / "s2s").predict(x)]
    predictor = Predictor.load(bundles / "ctc")
    frames = predictor.scores(predictor.preprocess(x)).numpy()  # the CTC model keeps its per-frame scores
    np.testing.assert_allclose(response.as_numpy("values"), frames, atol=ATOL, rtol=0)


def test_the_file_endpoint_gives_the_cli_jsonl_with_top_k(server, bundles, tmp_path):
    np.save(tmp_path / "rows.npy", 3 * images(3, seed=6).numpy())
    body = (tmp_path / "rows.npy").read_bytes()
    for name in ("s2s", "ctc"):
        predictor = Predictor.load(bundles / name)
        for top_k in (None, 2):
            query = f"filename={tmp_path / 'rows.npy'}" + (f"&top_k={top_k}" if top_k else "")
            status, answer, _ = post(f"{server.url}/v2/models/{name}/predict?{query}", body)
            assert status == 200, answer
            expected = io.StringIO()
            items = gather_inputs([str(tmp_path / "rows.npy")], predictor.preprocess_spec)
            write_results(predictions(predictor, items, top_k), "jsonl", expected)
            got = [json.loads(line) for line in answer.decode().splitlines()]
            want = [json.loads(line) for line in expected.getvalue().splitlines()]
            assert [g.pop("id") for g in got] == [w.pop("id") for w in want]
            assert all(("n_best" in g) == (top_k == 2) for g in got)
            assert_results_close(got, want, atol=ATOL)


def metric(server, name: str, labels: str) -> float:
    status, body, _ = get(server.url + "/metrics")
    assert status == 200
    lines = [line for line in body.decode().splitlines() if line.startswith(name + "{") and labels in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_requests_decoded_together_get_what_each_gets_alone(server, bundles):
    """Concurrent requests share batches of the search; each answer equals its request decoded alone
    (one request at a time through the same server), whatever else its batch held. Requests asking
    for another ``top_k`` never share a batch with them and get the search of their own ``top_k``."""
    inputs = [3 * images(1 + i % 3, seed=200 + i).numpy() for i in range(24)]  # x3: the decoded texts differ
    top_ks = [None if i % 4 else 2 for i in range(24)]
    local = threading.local()

    def ask(i: int) -> list[dict]:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(server.address, network_timeout=120.0)
        if top_ks[i] is None:
            return decoded(infer(local.client, "s2s", inputs[i]))
        buffer = io.BytesIO()
        np.save(buffer, inputs[i])
        status, body, _ = post(f"{server.url}/v2/models/s2s/predict?top_k=2", buffer.getvalue(), timeout=120)
        assert status == 200, body
        return [{k: v for k, v in json.loads(line).items() if k != "id"} for line in body.decode().splitlines()]

    alone = [ask(i) for i in range(len(inputs))]
    before = metric(server, "trainfer_batch_samples_count", 'model="s2s"')
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, range(len(inputs))))
    batches = metric(server, "trainfer_batch_samples_count", 'model="s2s"') - before
    for got, want in zip(together, alone, strict=True):
        assert_results_close(got, want, atol=ATOL)
    assert 0 < batches < len(inputs), f"{batches} batches for {len(inputs)} concurrent requests: none shared"
    assert len({r["text"] for answer in alone for r in answer}) > 1  # a mix-up of rows would show
    predictor = Predictor.load(bundles / "s2s")
    for i in (0, 1, 4):  # and what the Predictor decodes in process
        want = predictor.predict(inputs[i], top_k=top_ks[i])
        assert_results_close(alone[i], summary(want) if top_ks[i] is None else want, atol=ATOL)


def test_bad_requests_are_one_line_400s(server, bundles):
    buffer = io.BytesIO()
    np.save(buffer, images(1).numpy())
    status, body, _ = post(f"{server.url}/v2/models/s2s/predict?top_k=65", buffer.getvalue())
    error = json.loads(body)["error"]
    assert (
        status == 400
        and error == "top_k 65 is more than the 64 hypotheses a sequence model returns at most: give at most 64"
    )
    wrong = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
    status, body, _ = post(f"{server.url}/v2/models/s2s/infer", json.dumps(wrong).encode())
    error = json.loads(body)["error"]
    assert status == 400 and "shape" in error and "\n" not in error, body
    ids = {"inputs": [{"name": "input", "shape": [1, 1, 8, 64], "datatype": "INT64", "data": [1.5] * 512}]}
    status, body, _ = post(f"{server.url}/v2/models/s2s/infer", json.dumps(ids).encode())
    assert status == 400 and json.loads(body)["error"].startswith("input 'input': \"data\" must hold int64 integers")
    assert infer(httpclient.InferenceServerClient(server.address), "s2s", images(1).numpy())  # still serving


def test_explain_from_two_threads_at_once_answers_as_one_at_a_time(server, bundles):
    pytest.importorskip("captum")
    rng = np.random.default_rng(9)
    files = []
    for _ in range(2):
        buffer = io.BytesIO()
        np.save(buffer, rng.random((1, 1, 8, 8), dtype=np.float32))
        files.append(buffer.getvalue())

    def explain(body: bytes) -> np.ndarray:
        status, answer, _ = post(f"{server.url}/v2/models/tiny/explain?filename=x.npy", body, timeout=120)
        assert status == 200, answer
        return np.array(json.loads(answer)["heatmap"])

    one_at_a_time = [explain(body) for body in files]
    start = threading.Barrier(2)

    def at_once(body: bytes) -> np.ndarray:
        start.wait(30)
        return explain(body)

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(at_once, files))
    for got, want in zip(both, one_at_a_time, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    predictor = Predictor.load(bundles / "tiny")  # and the attributions in process, normalised as the server does
    for body, got in zip(files, both, strict=True):
        values = predictor.explain(np.load(io.BytesIO(body))).values[0].double().abs().sum(0)
        np.testing.assert_allclose(got, (values / values.max()).numpy(), atol=1e-5, rtol=0)
    assert not np.allclose(both[0], both[1])  # two different answers: a swap would be seen


def test_only_a_top_k_that_changes_the_search_keeps_requests_apart(bundles):
    from trainfer.server.model import ServedModel

    s2s = ServedModel("s2s", Predictor.load(bundles / "s2s"))  # n_best 1: None and 1 decode alike
    assert [s2s.key(k) for k in (None, 1, 2, 5)] == [None, None, 2, 5]
    ctc = ServedModel("ctc", Predictor.load(bundles / "ctc"))  # one forward per batch: top_k never matters
    assert [ctc.key(k) for k in (None, 1, 2)] == [None, None, None]
