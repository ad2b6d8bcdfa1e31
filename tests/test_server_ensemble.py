"""``trainfer serve A B --ensemble NAME [--weights ...]``: several bundles served as ONE model, their ensemble.

A real server must answer what ``Predictor.ensemble(members, weights).predict`` answers (``/infer``,
``/predict``), with the weights honoured, the same to many client threads as to one, and the metadata of
one model; ``/explain`` is a one-line 400. The bad combinations the library refuses, and those of the
command's options, are refused at start in one line with exit code 2.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from click.testing import CliRunner
from server_process import TESTS, free_port, get, post, running_server
from serving_models import save_bundle
from test_sequence_generation import LABELS as TOKENS
from test_sequence_generation import SETTINGS, images, tiny_model

import trainfer
from trainfer import Predictor
from trainfer.cli import main
from trainfer.cli.predict import gather_inputs, predictions, write_results
from trainfer.errors import InputError

httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # one server subprocess for the module, and one refused at start

LABELS = ["cat", "dog", "eel"]
WEIGHTS = [2.0, 1.0]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Members ``a`` and ``b`` that normalise differently (``b`` in float64), and bundles that cannot join them."""
    root = tmp_path_factory.mktemp("ensemble")
    save_bundle(root / "a", seed=0, labels=LABELS, preprocess={"mean": [0.4], "std": [0.3]})
    save_bundle(root / "b", seed=2, labels=LABELS, dtype=torch.float64)
    save_bundle(root / "other_labels", seed=3, labels=["x", "y", "z"])
    save_bundle(root / "scaled", seed=4, labels=LABELS, preprocess={"pixel_scale": 1.0})
    save_bundle(root / "yes", seed=1, task="binary", outputs=1, final="sigmoid")
    save_bundle(root / "no", seed=5, task="binary", outputs=1, final="sigmoid")
    trainfer.save(
        tiny_model(), root / "s2s", task="sequence", labels=TOKENS, decoder=SETTINGS, example_inputs=images(2)
    )
    return root


@pytest.fixture(scope="module")
def server(bundles):
    members = [str(bundles / "a"), str(bundles / "b")]
    with running_server(
        *members, "--ensemble", "duo", "--weights", "2,1", "--max-batch", "8", "--max-delay-ms", "20"
    ) as up:
        yield up


def ensemble(bundles, weights=WEIGHTS, members=("a", "b")):
    return Predictor.ensemble([Predictor.load(bundles / m) for m in members], weights)


def samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 8, 8), dtype=np.float32)


def infer(client, x: np.ndarray, binary: bool = True) -> list[dict]:
    """The ensemble's answer to ``x`` through Triton's client, as the typed results' records (top-1)."""
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    response = client.infer("duo", [tensor])
    probabilities, labels, spread = (response.as_numpy(n) for n in ("probabilities", "label", "spread"))
    rows = []
    for p, label, s, index in zip(probabilities, labels, spread, response.as_numpy("index"), strict=True):
        name = label.decode() if isinstance(label, bytes) else label
        top = [[name, float(p[index])]]
        rows.append({"index": int(index), "label": name, "probability": float(p[index]), "top_k": top, "members": 2})
        rows[-1]["spread"] = float(s)
    return rows


def test_one_model_is_served_with_the_ensembles_metadata(server):
    status, body, _ = get(server.url + "/v2/models")
    assert json.loads(body) == {"models": [{"name": "duo", "ready": True}]}
    torch_model = "torch, the bundle's PyTorch model"
    assert f"model 'duo' ready (an ensemble of 2 members: {torch_model}; {torch_model}) from" in server.logs()
    assert get(server.url + "/v2/models/a")[0] == 404  # members are not served on their own
    metadata = json.loads(get(server.url + "/v2/models/duo")[1])
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 1, 8, 8]}]  # b's float64
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs == {
        "probabilities": ("FP64", [-1, 3]),
        "index": ("INT64", [-1]),
        "label": ("BYTES", [-1]),
        "spread": ("FP64", [-1]),
    }
    parameters = metadata["parameters"]
    assert (parameters["task"], parameters["labels"], parameters["members"]) == ("classification", LABELS, 2)
    np.testing.assert_allclose(parameters["weights"], [2 / 3, 1 / 3], rtol=1e-15)


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_infer_equals_predictor_ensemble_with_its_weights(server, bundles, binary):
    client = httpclient.InferenceServerClient(server.address, network_timeout=60.0)
    x = samples(5, seed=3)
    got = infer(client, x, binary)
    client.close()
    assert_results_close(got, ensemble(bundles).predict(x))
    equal = [r.probability for r in ensemble(bundles, weights=None).predict(x)]
    assert np.abs(np.array([r["probability"] for r in got]) - equal).max() > 1e-3  # the weights count


def test_predict_endpoint_gives_the_jsonl_of_trainfer_predict_on_the_members(server, bundles, tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, samples(4, seed=8))
    status, body, _ = post(f"{server.url}/v2/models/duo/predict?top_k=2&filename={path}", path.read_bytes())
    assert status == 200, body
    voted = ensemble(bundles)
    expected = io.StringIO()
    write_results(predictions(voted, gather_inputs([str(path)], voted.preprocess_spec), 2), "jsonl", expected)
    got, want = ([json.loads(line) for line in text.splitlines()] for text in (body.decode(), expected.getvalue()))
    assert [g.pop("id") for g in got] == [w.pop("id") for w in want]
    assert_results_close(got, want)


def test_many_threads_get_single_threaded_answers_and_one_batch_runs_every_member(server, bundles):
    voted = ensemble(bundles)
    inputs = [samples(1 + i % 4, seed=100 + i) for i in range(48)]  # 1..4 samples: batches mix sizes
    expected = [voted.predict(x) for x in inputs]
    local = threading.local()

    def ask(x: np.ndarray) -> list[dict]:
        if not hasattr(local, "client"):
            local.client = httpclient.InferenceServerClient(server.address, network_timeout=60.0)
        return infer(local.client, x)

    before = metric(server, "trainfer_batch_samples_count")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, inputs))
    for got, want in zip(answers, expected, strict=True):
        assert_results_close(got, want)
    batches = metric(server, "trainfer_batch_samples_count") - before
    assert 0 < batches < len(inputs), f"{batches} batches for {len(inputs)} concurrent requests: none shared"


def metric(server, name: str) -> float:
    """The ensemble's sample of metric ``name``."""
    lines = get(server.url + "/metrics")[1].decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + '{model="duo"'))


def test_explain_is_a_one_line_400_naming_the_way_out(server):
    buffer = io.BytesIO()
    np.save(buffer, samples(1, seed=1))
    status, body, _ = post(f"{server.url}/v2/models/duo/explain?filename=x.npy", buffer.getvalue())
    error = json.loads(body)["error"]
    assert status == 400 and "'duo' is an ensemble of 2 bundles" in error and "serve a member on its own" in error


def test_a_binary_ensemble_decides_on_its_weighted_mean(bundles):
    """Not through HTTP: the served model's outputs and typed results against ``Predictor.ensemble``'s."""
    from trainfer.server.ensemble_model import load_ensemble

    served = load_ensemble(
        "vote", [bundles / "yes", bundles / "no"], [1, 3], runtime=None, trust_factory=False, max_batch=8
    )
    x = samples(6, seed=9)
    rows = served.compute(served.prepare(x))
    want = ensemble(bundles, weights=[1, 3], members=("yes", "no")).predict(x)
    tensors = served.tensors(rows)
    assert set(tensors) == {"probability", "decision", "label", "spread"}
    np.testing.assert_allclose(tensors["probability"], [r.probability for r in want], atol=1e-6, rtol=0)
    np.testing.assert_allclose(tensors["spread"], [r.spread for r in want], atol=1e-6, rtol=0)
    assert tensors["decision"].tolist() == [r.decision for r in want]
    assert tensors["label"].tolist() == [str(int(r.decision)).encode() for r in want]
    assert_results_close(served.results(rows, None), want)
    # a request's threshold decides on the same weighted mean
    cut = float(np.median(tensors["probability"]))
    decided = served.results(rows, None, threshold=cut)
    assert [r.decision for r in decided] == [bool(p > cut) for p in tensors["probability"]]
    assert len(set(r.decision for r in decided)) == 2  # the cut splits the samples: the check compares both ways


@pytest.mark.parametrize(
    ("members", "weights"),
    [
        (("a", "other_labels"), None),
        (("a", "yes"), None),
        (("s2s", "s2s"), None),
        (("a", "b"), [1.0]),
        (("a", "b"), [0.0, 0.0]),
    ],
    ids=["labels", "task", "sequence", "weight-count", "zero-weights"],
)
def test_members_are_refused_as_predictor_ensemble_refuses_them(bundles, members, weights):
    from trainfer.server.ensemble_model import load_ensemble

    with pytest.raises(InputError) as library:
        ensemble(bundles, weights, members)
    paths = [bundles / m for m in members]
    with pytest.raises(InputError) as served:
        load_ensemble("duo", paths, weights, runtime=None, trust_factory=False, max_batch=8)
    assert str(served.value) == str(library.value)


def test_members_reading_image_files_differently_are_refused(bundles):
    from trainfer.server.ensemble_model import load_ensemble

    with pytest.raises(InputError, match="member 0 has pixel_scale 0.00392.*, member 1 has 1.0"):
        load_ensemble("duo", [bundles / "a", bundles / "scaled"], None, runtime=None, trust_factory=False, max_batch=8)


def test_a_refused_ensemble_stops_the_server_at_start_in_one_line_with_exit_code_2(bundles):
    members = [str(bundles / "a"), str(bundles / "other_labels")]
    command = [sys.executable, "-m", "trainfer", "serve", *members, "--ensemble", "duo", "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_environment())
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr
    assert errors == [
        "error: ensemble members disagree on labels: member 0 has ['cat', 'dog', 'eel'], member 1 has ['x', 'y', 'z']"
    ]
    assert "Traceback" not in done.stderr


def _environment() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--weights", "2,1"], "--weights weighs the members of an ensemble: add --ensemble NAME"),
        (["--ensemble", "duo", "--names", "x,y"], "with --ensemble every bundle is a member: drop --names"),
        (["--ensemble", "duo", "--compile"], "--compile searches one bundle's runtime, not an ensemble's"),
        (["--ensemble", "duo", "--weights", "1"], "expected 2 ensemble weights (one per predictor); got 1"),
        (["--ensemble", "duo", "--weights", "1,-1"], "ensemble weights must be finite and non-negative"),
        (["--ensemble", "a/b"], "model name 'a/b': expected 1 to 128 ASCII letters"),
    ],
)
def test_bad_combinations_are_refused_before_serving_in_one_line(bundles, monkeypatch, options, message):
    served = []
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **kwargs: served.append(settings))
    refused = CliRunner().invoke(main, ["serve", str(bundles / "a"), str(bundles / "b"), *options])
    assert refused.exit_code == 2, refused.output
    lines = refused.output.splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], refused.output
    assert not served


def test_the_settings_name_the_ensemble_and_its_weights(bundles, monkeypatch):
    served = []
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **kwargs: served.append(settings))
    members = [str(bundles / "a"), str(bundles / "b")]
    result = CliRunner().invoke(main, ["serve", *members, "--ensemble", "duo", "--weights", "2,1"])
    assert result.exit_code == 0, result.output
    (settings,) = served
    assert (settings.bundles, settings.ensembles, settings.weights) == ({}, {"duo": members}, {"duo": WEIGHTS})
    assert settings.names == ["duo"]


def test_help_names_the_ensemble_options():
    shown = CliRunner().invoke(main, ["serve", "--help"], terminal_width=120).output
    assert "--ensemble NAME" in shown and "Serve the bundles as ONE model called NAME" in shown
    assert "--weights TEXT" in shown and "With --ensemble: its weights, one per bundle" in shown


def test_settings_refuse_a_name_served_twice_and_weights_of_no_ensemble():
    from trainfer.server.state import ServerSettings

    with pytest.raises(InputError, match=r"model names \['duo'\] name both a bundle and an ensemble"):
        ServerSettings(bundles={"duo": "a"}, ensembles={"duo": ["a", "b"]})
    with pytest.raises(InputError, match=r"weights for \['trio'\], which no ensemble is called"):
        ServerSettings(bundles={}, ensembles={"duo": ["a", "b"]}, weights={"trio": [1, 2]})
    with pytest.raises(InputError, match="model name 'a/b'"):
        ServerSettings(bundles={}, ensembles={"a/b": ["a", "b"]})
    assert ServerSettings(bundles={"a": "a"}, ensembles={"duo": ["a", "b"]}).names == ["a", "duo"]
