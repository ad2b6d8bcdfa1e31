"""``trainfer serve`` under pressure: overload (503 + Retry-After, then recovery), request timeouts
(504), SIGTERM with requests in flight, to one server process or two (answered, then a clean exit),
and a bundle that cannot be served (one line, exit 2, never ready). Each runs a server subprocess
that is always stopped."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from agreement import assert_results_close
from server_process import TESTS, get, post, running_server
from serving_models import HOLD, save_bundle, save_held_bundle

from trainfer import Predictor

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_bundle(tmp_path_factory.mktemp("lifecycle") / "tiny", seed=2, labels=LABELS)


def request_body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def labels_and_probabilities(body: bytes) -> list[dict]:
    tensors = {t["name"]: t for t in json.loads(body)["outputs"]}
    rows = np.reshape(tensors["probabilities"]["data"], tensors["probabilities"]["shape"])
    return [
        {"index": int(r.argmax()), "label": lbl, "probability": float(r.max()), "top_k": [[lbl, float(r.max())]]}
        for r, lbl in zip(rows, tensors["label"]["data"], strict=True)
    ]


def queued(server) -> float:
    text = get(server.url + "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("trainfer_queue_samples{"))


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def held(tmp_path):
    """A bundle whose model holds a batch with a HOLD sample until the file ``gate`` exists."""
    gate = tmp_path / "gate"
    return save_held_bundle(tmp_path / "tiny", seed=2, gate=gate, labels=LABELS), gate


def hold(pool, server, gate):
    """A request the model holds (busy) until ``gate`` is created: its future, once it is running."""
    gate.unlink(missing_ok=True)
    x = np.full((1, 1, 8, 8), HOLD, dtype=np.float32)
    future = pool.submit(post, f"{server.url}/v2/models/tiny/infer", request_body(x), 60.0)
    wait_for(gate.with_suffix(".held").exists)  # in the model, which holds it
    return future


def test_overload_is_503_with_retry_after_then_recovery_and_sigterm_answers_in_flight(held):
    bundle, gate = held
    args = [str(bundle), "--max-batch", "64", "--max-queue", "3", "--max-delay-ms", "0"]
    inputs = [np.random.default_rng(i).random((1, 1, 8, 8), dtype=np.float32) for i in range(3)]
    expected = [Predictor.load(bundle).predict(x) for x in inputs]
    url_of = "{}/v2/models/tiny/infer".format
    with running_server(*args) as server, ThreadPoolExecutor(4) as pool:
        for round_ in ("overload", "sigterm"):
            busy = hold(pool, server, gate)
            waiting = [pool.submit(post, url_of(server.url), request_body(x), 60.0) for x in inputs]
            wait_for(lambda: queued(server) == 3)  # they wait for the busy model: the queue is full
            status, body, headers = post(url_of(server.url), request_body(inputs[0]))
            assert status == 503 and headers.get("retry-after") == "1", (status, body)
            assert "overloaded" in json.loads(body)["error"]
            if round_ == "sigterm":
                server.process.send_signal(signal.SIGTERM)
            gate.touch()
            assert busy.result(timeout=60)[0] == 200
            for future, want in zip(waiting, expected, strict=True):
                status, body, _ = future.result(timeout=60)
                assert status == 200, body
                assert_results_close(labels_and_probabilities(body), want)
        # uvicorn re-raises the SIGTERM after its graceful shutdown: the process ends by that signal
        assert server.process.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.logs()


def test_sigterm_to_two_worker_processes_answers_the_request_in_flight_then_ends_by_sigterm(held):
    bundle, gate = held
    with running_server(str(bundle), "--workers", "2") as server, ThreadPoolExecutor(1) as pool:
        busy = hold(pool, server, gate)
        server.process.send_signal(signal.SIGTERM)  # to the supervisor, which passes it to its workers
        wait_for(lambda: server.logs().count("Shutting down") == 2)  # both workers stopped accepting
        wait_for(lambda: refused(server.port))  # while they drain: no connection the kernel would then reset
        gate.touch()
        assert busy.result(timeout=60)[0] == 200
        assert server.process.wait(30) == -signal.SIGTERM


def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (nothing listens), not accepted into a backlog no one reads."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_request_waiting_past_its_timeout_is_504_and_the_server_goes_on(held):
    bundle, gate = held
    with running_server(str(bundle), "--timeout", "0.5") as server, ThreadPoolExecutor(1) as pool:
        busy = hold(pool, server, gate)
        x = np.zeros((2, 1, 8, 8), dtype=np.float32)
        status, body, _ = post(f"{server.url}/v2/models/tiny/infer", request_body(x))  # waits for the busy model
        assert status == 504 and "timeout of 0.5 s" in json.loads(body)["error"]
        assert busy.result(timeout=60)[0] == 504  # held past its timeout too
        gate.touch()
        wait_for(lambda: not gate.with_suffix(".held").exists())
        assert post(f"{server.url}/v2/models/tiny/infer", request_body(x))[0] == 200
        assert get(f"{server.url}/v2/health/ready")[0] == 200


def test_a_bundle_that_cannot_be_served_stops_the_server_in_one_line(tmp_path):
    bundle = save_bundle(tmp_path / "bundle", seed=0)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["factory"] = "os:system"  # not an allowed factory: refused before any import
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    env = {"PYTHONPATH": f"{TESTS.parent}:{TESTS}"}
    done = subprocess.run(
        [sys.executable, "-m", "trainfer", "serve", str(bundle), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "os:system" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_two_worker_processes_serve_the_same_answers(bundle):
    x = np.random.default_rng(9).random((2, 1, 8, 8), dtype=np.float32)
    with running_server(str(bundle), "--workers", "2") as server:
        answers = [post(f"{server.url}/v2/models/tiny/infer", request_body(x)) for _ in range(4)]
    expected = Predictor.load(bundle).predict(x)
    for status, body, _ in answers:
        assert status == 200, body
        assert_results_close(labels_and_probabilities(body), expected)
