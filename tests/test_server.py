"""``trainfer serve`` end to end: a real server in a subprocess, spoken to by Triton's client and curl.

Answers are compared with ``Predictor.predict`` on the same inputs (within the batch-composition
tolerance of ``agreement``); mistakes must come back as one-line 400s with the CLI's messages, and
the server must keep serving after them.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from agreement import assert_results_close
from server_process import get, post, running_server
from serving_models import save_bundle, write_pngs

from trainfer import Predictor
from trainfer.cli.predict import gather_inputs, predictions, write_results
from trainfer.errors import InputError
from trainfer.serve.readers import check_csv_fits

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # one server subprocess for the module: about 15 s to start on 2 busy cores

KEY = "k" * 24
KEY_HEADER = {"X-API-Key": KEY}


def key() -> dict[str, str]:
    """The API key header, a fresh dict (tritonclient adds its own headers to the dict it is given)."""
    return dict(KEY_HEADER)


LABELS = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    save_bundle(root / "tiny", seed=0, labels=LABELS, preprocess={"mean": [0.4], "std": [0.3]})
    save_bundle(root / "yesno", seed=1, task="binary", outputs=1, final="sigmoid")
    return root


@pytest.fixture(scope="module")
def server(bundles):
    args = [str(bundles / "tiny"), str(bundles / "yesno"), "--max-batch", "8", "--max-delay-ms", "20"]
    with running_server(*args, "--max-body-mb", "1", "--api-key-env", "SERVE_KEY", env={"SERVE_KEY": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.address, network_timeout=60.0, connection_timeout=60.0)
    yield client
    client.close()


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 8, 8), dtype=np.float32)


def infer(client, x: np.ndarray, binary: bool = True, model: str = "tiny"):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    return client.infer(model, [tensor], outputs=outputs if model == "tiny" else None, headers=key())


def records(response) -> list[dict]:
    """The classification records a response's tensors describe (top-1)."""
    probabilities, labels = response.as_numpy("probabilities"), response.as_numpy("label")
    rows = []
    for p, label in zip(probabilities.tolist(), labels.tolist(), strict=True):
        index = int(np.argmax(p))
        rows.append(
            {
                "index": index,
                "label": label if isinstance(label, str) else label.decode(),
                "probability": p[index],
                "top_k": [[LABELS[index], p[index]]],
            }
        )
    return rows


def test_health_metadata_and_readiness_through_tritonclient(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny", headers=key()) and client.is_model_ready("yesno", headers=key())
    metadata = client.get_model_metadata("tiny", headers=key())
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, 3]), "index": ("INT64", [-1]), "label": ("BYTES", [-1])}
    binary = {o["name"]: o["datatype"] for o in client.get_model_metadata("yesno", headers=key())["outputs"]}
    assert binary == {"probability": "FP32", "decision": "BOOL", "label": "BYTES"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_infer_equals_predictor_predict(client, bundles, binary):
    predictor = Predictor.load(bundles / "tiny")
    x = samples(5, seed=3)
    response = infer(client, x, binary=binary)
    assert response.as_numpy("probabilities").dtype == np.float32
    assert_results_close(records(response), predictor.predict(x))
    expected = predictor.scores(predictor.preprocess(x))
    np.testing.assert_allclose(response.as_numpy("probabilities"), expected.numpy(), atol=1e-6, rtol=0)


def test_binary_model_outputs_equal_predictor(client, bundles):
    x = samples(4, seed=4)
    response = infer(client, x, model="yesno")
    expected = Predictor.load(bundles / "yesno").predict(x)
    np.testing.assert_allclose(response.as_numpy("probability"), [r.probability for r in expected], atol=1e-6)
    assert response.as_numpy("decision").tolist() == [r.decision for r in expected]
    assert [label.decode() for label in response.as_numpy("label")] == [str(int(r.decision)) for r in expected]


def test_many_threads_get_single_threaded_answers_and_requests_share_batches(server, bundles):
    predictor = Predictor.load(bundles / "tiny")
    inputs = [samples(1 + i % 4, seed=100 + i) for i in range(48)]  # 1..4 samples: batches mix sizes
    expected = [predictor.predict(x) for x in inputs]
    local = threading.local()

    def ask(x: np.ndarray):
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(server.address, network_timeout=60.0)
        return records(infer(local.client, x))

    batches_before = metric(server, "trainfer_batch_samples_count", 'model="tiny"')
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, inputs))
    for got, want in zip(answers, expected, strict=True):
        assert_results_close(got, want)
    batches = metric(server, "trainfer_batch_samples_count", 'model="tiny"') - batches_before
    assert 0 < batches < len(inputs), f"{batches} batches for {len(inputs)} concurrent requests: none shared"


def metric(server, name: str, labels: str = "") -> float:
    """The sum of the samples of metric ``name`` whose labels contain ``labels``."""
    status, body, _ = get(server.url + "/metrics", headers=KEY_HEADER)
    assert status == 200
    lines = [line for line in body.decode().splitlines() if line.startswith(name + "{") and labels in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def curl(*args: str) -> tuple[int, bytes]:
    """``curl`` an URL: (HTTP status, body)."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def test_curl_infer_with_json_tensors(server, bundles):
    x = samples(2, seed=5)
    request = {
        "id": "r1",
        "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    url = f"{server.url}/v2/models/tiny/infer"
    status, body = curl(
        "-H", f"X-API-Key: {KEY}", "-H", "Content-Type: application/json", "-d", json.dumps(request), url
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["id"] == "r1" and answer["model_name"] == "tiny"
    tensors = {t["name"]: t for t in answer["outputs"]}
    assert tensors["probabilities"]["shape"] == [2, 3] and tensors["label"]["datatype"] == "BYTES"
    predictor = Predictor.load(bundles / "tiny")
    expected = predictor.predict(x)
    scores = predictor.scores(predictor.preprocess(x)).numpy()
    np.testing.assert_allclose(np.reshape(tensors["probabilities"]["data"], (2, 3)), scores, atol=1e-6, rtol=0)
    assert tensors["label"]["data"] == [r.label for r in expected]
    assert tensors["index"]["data"] == [r.index for r in expected]


def test_curl_file_endpoint_gives_the_cli_jsonl(server, bundles, tmp_path):
    images = write_pngs(tmp_path / "images", 2, seed=7)
    rows = samples(3, seed=8)
    np.save(tmp_path / "rows.npy", rows)
    predictor = Predictor.load(bundles / "tiny")
    for path, kind in [(images[0], "image/png"), (tmp_path / "rows.npy", "application/octet-stream")]:
        url = f"{server.url}/v2/models/tiny/predict?top_k=2&filename={path}"
        status, body = curl("-H", f"X-API-Key: {KEY}", "-H", f"Content-Type: {kind}", "--data-binary", f"@{path}", url)
        assert status == 200, body
        expected = io.StringIO()
        write_results(
            predictions(predictor, gather_inputs([str(path)], predictor.preprocess_spec), 2), "jsonl", expected
        )
        got, want = (
            [json.loads(line) for line in body.decode().splitlines()],
            [json.loads(line) for line in expected.getvalue().splitlines()],
        )
        assert [g.pop("id") for g in got] == [w.pop("id") for w in want]
        assert_results_close(got, want)


def test_csv_rows_through_the_file_endpoint(server, bundles):
    header = ",".join(f"c{i}" for i in range(64))
    x = samples(2, seed=9)
    text = header + "\n" + "\n".join(",".join(map(repr, row.ravel().tolist())) for row in x) + "\n"
    status, body, _ = post(f"{server.url}/v2/models/tiny/predict?filename=t.csv", text.encode(), headers=key())
    # the tiny bundle takes (1, 8, 8) samples, not rows: the refusal trainfer predict gives a CSV file, one line
    assert status == 400
    with pytest.raises(InputError) as refused:
        check_csv_fits(Predictor.load(bundles / "tiny").preprocess_spec, "t.csv")
    assert json.loads(body)["error"] == " ".join(str(refused.value).split())
    assert "CSV rows are samples of shape (F,)" in json.loads(body)["error"]


def test_bad_inputs_are_400_with_the_cli_message_and_the_server_keeps_serving(server, client, bundles):
    url = f"{server.url}/v2/models/tiny/infer"
    wrong = np.zeros((1, 3, 8, 8), dtype=np.float32)
    with pytest.raises(InputError) as refused:
        Predictor.load(bundles / "tiny").predict(wrong)
    cases = {
        "wrong shape": (_json_request(wrong), " ".join(str(refused.value).split())),
        "not json": (b"{inputs", "the request body is not valid JSON"),
        "no inputs": (b"{}", '"inputs"'),
        "bad datatype": (
            json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP8", "data": [1]}]}).encode(),
            "FP8",
        ),
        "count mismatch": (
            json.dumps(
                {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [1.0]}]}
            ).encode(),
            "needs 128",
        ),
        "wrong name": (_json_request(samples(1, 0), name="image"), "one input named 'input'"),
        "not finite": (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', "finite"),
        "strings": (
            json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ["x"]}]}).encode(),
            "numbers only",
        ),
        "lone surrogate id": (_json_request(samples(1, 0))[:-1] + b', "id": "\\ud800"}', '"id" must be valid Unicode'),
        "binary_data as a string": (
            _json_request(samples(1, 0))[:-1]
            + b', "outputs": [{"name": "label", "parameters": {"binary_data": "false"}}]}',
            "parameter 'binary_data' of output 'label' must be true or false",
        ),
    }
    for case, (body, message) in cases.items():
        status, answer, _ = post(url, body, headers={**KEY_HEADER, "Content-Type": "application/json"})
        assert status == 400, (case, answer)
        error = json.loads(answer)["error"]
        assert message in error and "\n" not in error and "Traceback" not in error, (case, error)
    status, answer, _ = post(f"{server.url}/v2/models/tiny/predict?filename=x.png", b"not a png", headers=key())
    assert status == 400 and "cannot read image 'x.png'" in json.loads(answer)["error"]
    status, answer, _ = post(f"{server.url}/v2/models/tiny/predict?top_k=0", b"x", headers=key())
    assert status == 400 and "top_k" in json.loads(answer)["error"]
    with pytest.raises(InputError) as refused_top_k:
        Predictor.load(bundles / "yesno").predict(samples(1, 0), top_k=2)
    status, answer, _ = post(f"{server.url}/v2/models/yesno/predict?top_k=2", b"x", headers=key())
    assert (status, json.loads(answer)["error"]) == (400, str(refused_top_k.value))  # not silently ignored
    with pytest.raises(InputError) as refused_top_k:
        Predictor.load(bundles / "tiny").predict(samples(1, 0), top_k=len(LABELS) + 1)
    status, answer, _ = post(f"{server.url}/v2/models/tiny/predict?top_k={len(LABELS) + 1}", b"x", headers=key())
    assert (status, json.loads(answer)["error"]) == (400, str(refused_top_k.value))  # not cut to the classes
    assert str(refused_top_k.value) == "top_k 4 is more than the 3 classes: give at most 3"
    x = np.full((1, 1, 8, 8), 1e39, dtype=np.float64)  # finite, but not once cast to float32
    status, answer, _ = post(url, _json_request(x, "FP64"), headers=key())
    assert status == 400 and "overflow float32" in json.loads(answer)["error"]
    assert records(infer(client, samples(1, 1)))  # still serving
    assert metric(server, "trainfer_requests_total", 'status="400"') >= len(cases)


def _json_request(x: np.ndarray, datatype: str = "FP32", name: str = "input") -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}
    ).encode()


def test_oversize_bodies_are_413_declared_or_streamed(server, tmp_path):
    """Refused on the declared Content-Length (curl waits for 100-continue, so the refusal comes
    before the body), and on a chunked body as soon as it passes the limit."""
    url = f"{server.url}/v2/models/tiny/infer"
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 * 2**20))
    for chunked in ([], ["-H", "Transfer-Encoding: chunked"]):
        status, answer = curl("-H", f"X-API-Key: {KEY}", *chunked, "--data-binary", f"@{big}", url)
        assert status == 413 and "exceeds the limit of 1048576 bytes" in json.loads(answer)["error"], answer


def test_api_key_unknown_models_versions_and_open_health(server):
    url = f"{server.url}/v2/models/tiny"
    assert get(url)[0] == 401
    assert get(url, headers={"X-API-Key": "k" * 23 + "j"})[0] == 401
    assert get(url, headers=KEY_HEADER)[0] == 200
    assert get(url + "/versions/1", headers=KEY_HEADER)[0] == 200
    assert get(url + "/versions/2", headers=KEY_HEADER)[0] == 404
    assert get(f"{server.url}/v2/models/nope", headers=KEY_HEADER)[0] == 404
    assert get(f"{server.url}/metrics")[0] == 401
    assert get(f"{server.url}/v2/health/live")[0] == 200 and get(f"{server.url}/v2/health/ready")[0] == 200
    status, body, _ = get(f"{server.url}/v2", headers=key())
    assert status == 200 and "binary_tensor_data" in json.loads(body)["extensions"]


def test_head_over_http_answers_as_get_without_a_body_and_the_key_still_guards_it(server):
    """Through uvicorn: ``HEAD /`` and the health probes are 200 with ``GET``'s headers and no body;
    ``HEAD /metrics`` needs the API key as ``GET`` does; the access log names the method ``HEAD``."""

    def head(path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
        request = urllib.request.Request(f"{server.url}{path}", headers=headers or {}, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    for path in ("/", "/v2/health/live", "/v2/health/ready"):
        status, body, headers = head(path)
        _, got, got_headers = get(f"{server.url}{path}")
        assert (status, body) == (200, b"") and got, path
        assert headers["content-length"] == got_headers["content-length"] == str(len(got)), path
        assert headers["content-type"] == got_headers["content-type"], path
    assert head("/")[2]["x-frame-options"] == "DENY"
    assert head("/metrics")[0] == 401 and head("/metrics", key())[0] == 200
    assert any(r["method"] == "HEAD" and r["path"] == "/v2/health/ready" for r in server.access_records())


def test_openapi_metrics_and_access_log(server):
    status, body, _ = get(f"{server.url}/openapi.json")
    paths = json.loads(body)["paths"]
    assert status == 200 and {"/v2/models/{name}/infer", "/v2/models/{name}/predict", "/v2/health/ready"} <= set(paths)
    status, body, headers = get(f"{server.url}/metrics", headers=key())
    text = body.decode()
    for name in (
        "trainfer_requests_total",
        "trainfer_request_seconds_bucket",
        "trainfer_queue_samples",
        "trainfer_batch_samples_bucket",
        "trainfer_inference_seconds_bucket",
    ):
        assert name in text, name
    assert 'status="401"' in text
    logged = server.access_records()
    assert logged and {"time", "client", "method", "path", "status", "seconds"} <= set(logged[-1])
    assert all(r["client"] == "127.0.0.1" for r in logged)
