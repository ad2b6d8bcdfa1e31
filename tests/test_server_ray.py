"""``trainfer.server.ray_serve``: the server's app as a Ray Serve deployment on a local Ray cluster.

One test starts Ray on loopback (2 CPUs, no dashboard, its own temporary folder), deploys a bundle,
speaks the protocol to Ray's proxy with Triton's client and compares the answers with
``Predictor.predict``; Ray is always shut down, within a time limit. Skipped without ``ray``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
from server_process import free_port, get, post
from time_limit import time_limit

import trainfer
from trainfer import Predictor, models
from trainfer.errors import InputError, MissingExtraError
from trainfer.numerics import randomize_batchnorm
from trainfer.server.app import ServerSettings
from trainfer.server.ray_serve import build, deployment


def test_without_ray_the_deployment_names_the_extra(monkeypatch):
    pytest.importorskip("fastapi")
    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import ray.serve now fails
    with pytest.raises(MissingExtraError, match=r"trainfer\[ray\]"):
        deployment(ServerSettings(bundles={"m": "nowhere"}))


def test_a_config_files_args_are_the_server_settings():
    serve = pytest.importorskip("ray.serve")
    application = build({"bundles": {"m": "somewhere"}, "max_batch": 4})
    assert isinstance(application, serve.Application)
    for args in ({"bundle": {"m": "somewhere"}}, {"bundles": {"m": "x"}, "max_batchh": 4}, ["bundles"]):
        with pytest.raises(InputError, match="'bundles'"):
            build(args)


def test_a_start_up_runtime_search_is_refused_on_ray_serve():
    """Each replica would search on its own and could serve another form than its neighbours."""
    pytest.importorskip("fastapi")
    with pytest.raises(InputError, match="trainfer compile"):
        deployment(ServerSettings(bundles={"m": "nowhere"}, compile={"m": {}}))


@pytest.mark.slow  # Ray's start and a replica's load take 20 to 60 s on 2 busy cores
def test_a_ray_serve_replica_answers_the_protocol_as_the_predictor(tmp_path):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    httpclient = pytest.importorskip("tritonclient.http")
    torch.manual_seed(0)
    model = randomize_batchnorm(models.digits_net(), seed=0).eval()
    bundle = trainfer.save(trainfer.deploy(model, torch.randn(1, 1, 8, 8)), tmp_path / "digits")
    settings = ServerSettings(bundles={"digits": str(bundle)}, max_batch=8, max_delay_ms=2)
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live there
    try:
        with time_limit(300):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(deployment(settings), name="trainfer", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            assert get(url + "/v2/health/ready")[0] == 200
            client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60.0)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            response = client.infer("digits", [tensor])
            client.close()
            bad = post(url + "/v2/models/digits/infer", b'{"inputs": []}', headers={"Content-Type": "application/json"})
    finally:
        with time_limit(120):
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    expected = Predictor.load(bundle).predict(x, top_k=10)  # every class, most probable first
    probabilities = response.as_numpy("probabilities")
    assert probabilities.shape == (5, 10)
    ranked = -np.sort(-probabilities, axis=1)
    np.testing.assert_allclose(ranked, [[p for _, p in r.top_k] for r in expected], rtol=0, atol=1e-5)
    assert response.as_numpy("index").tolist() == [r.index for r in expected]
    assert bad[0] == 400 and "error" in json.loads(bad[1])
