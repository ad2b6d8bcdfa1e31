"""``trainfer serve BUNDLE --compile``: the runtime search (gated bf16/int8 with gate data) at start-up,
not ready meanwhile, serving what ``trainfer compile`` records for the same inputs; the bundle left
unchanged unless ``--write-runtime``. Real server processes on free loopback ports, always stopped."""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from search_hook import hooked_measure
from server_process import TESTS, get, post, running_server
from serving_models import gated_digits_bundle
from test_runtime_gated import INT8

import trainfer
from trainfer.cli import main
from trainfer.serve import runtime as rt

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

HOOKED = [sys.executable, str(TESTS / "search_hook.py"), "serve"]
#: eager float32 and one int8 candidate, two timed rounds: fast and deterministic with the hook
FAST = ("--candidates", "torch", "--candidates", INT8, "--rounds", "2")
OPEN = ("--min-agreement", "0", "--max-accuracy-drop", "1")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A deployed digits bundle (named ``digits``), 48 validation inputs and the float model's labels for them."""
    root = tmp_path_factory.mktemp("servecompile")
    gated_digits_bundle(root, "digits")
    return root


@pytest.fixture
def bundle(made, tmp_path):
    return shutil.copytree(made / "digits", tmp_path / "digits")


def files(bundle):
    return {path.name: path.read_bytes() for path in sorted(bundle.iterdir())}


def compile_record(made, tmp_path, monkeypatch, fast, *args):
    """What ``trainfer compile`` records for ``args`` on a fresh copy of the bundle (same hook, in process)."""
    monkeypatch.setattr(rt, "_measure", hooked_measure(rt._measure, None, fast))
    copy = shutil.copytree(made / "digits", tmp_path / "compiled" / "digits")
    result = CliRunner().invoke(main, ["compile", str(copy), *args])
    assert result.exit_code == 0, result.output
    return copy, rt.read_record(copy)


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def infer(server, x: np.ndarray) -> np.ndarray:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    status, body, _ = post(server.url + "/v2/models/digits/infer", json.dumps({"inputs": [tensor]}).encode())
    assert status == 200, body
    out = {t["name"]: t for t in json.loads(body)["outputs"]}["probabilities"]
    return np.reshape(out["data"], out["shape"])


@pytest.mark.slow
def test_not_ready_during_the_search_then_serves_what_compile_records(made, bundle, tmp_path, monkeypatch):
    gate, fast = tmp_path / "release", f"{INT8}/int8"
    env = {"TRAINFER_TEST_SEARCH_GATE": str(gate), "TRAINFER_TEST_SEARCH_FAST": fast}
    before = files(bundle)
    data = ("--gate-data", str(made / "x.npy"), "--labels", str(made / "y.npy"), *OPEN, *FAST)
    with running_server(str(bundle), "--compile", *data, env=env, ready=False, program=HOOKED) as server:
        wait_for(gate.with_suffix(".held").exists)  # the search is measuring, held by the hook
        assert get(server.url + "/v2/health/ready")[0] == 503
        assert get(server.url + "/v2/models/digits/ready")[0] == 503
        assert "searching the fastest of the float32, bf16 and int8 forms" in server.logs()
        gate.touch()
        wait_for(lambda: get(server.url + "/v2/health/ready")[0] == 200)
        metadata = json.loads(get(server.url + "/v2/models/digits")[1])
        x = np.load(made / "x.npy")[:8]
        served = infer(server, x)
        logs = server.logs()
    assert metadata["parameters"]["runtime"] == fast and f"serving {fast}, chosen by the search" in logs
    assert f"{fast} *" in logs and "torch/bfloat16" in logs  # every candidate's figures in the log
    assert files(bundle) == before  # no --write-runtime: the user's bundle is left as it was
    compiled, record = compile_record(made, tmp_path, monkeypatch, fast, *data)
    assert f"{record.runtime}/{record.dtype}" == fast
    predictor = trainfer.Predictor.load(compiled, runtime="recorded")
    expected = predictor.scores(predictor.preprocess(x)).numpy()  # the probabilities the server answers
    assert np.abs(served - expected).max() <= 1e-5 * np.abs(expected).max()  # the same int8 form, the same answers


@pytest.mark.slow
def test_a_refusing_gate_serves_float32_says_why_and_write_runtime_records_it(made, bundle, tmp_path, monkeypatch):
    before = files(bundle)
    data = ("--gate-data", str(made / "x.npy"), "--labels", str(made / "y.npy"), "--max-rel-error", "1e-9", *FAST)
    with running_server(str(bundle), "--compile", "--write-runtime", *data) as server:
        metadata = json.loads(get(server.url + "/v2/models/digits")[1])
        logs = server.logs()
    served = rt.read_record(bundle)
    assert metadata["parameters"]["runtime"] == f"{served.runtime}/{served.dtype}" and served.dtype == "float32"
    assert "no bf16 or int8 form passed the gate: float32 stays chosen" in logs and "recorded in" in logs
    assert "warning: compile: the int8 candidates are calibrated on the gate data" in logs  # no --calibration
    after = files(bundle)
    assert {name: after[name] for name in before} == before and set(after) - set(before) == {"runtime.json"}
    _, record = compile_record(made, tmp_path, monkeypatch, None, *data)
    by_name = {c.name: c.status for c in record.candidates}
    assert by_name == {c.name: c.status for c in served.candidates} and by_name[f"{INT8}/int8"] == "rejected"


@pytest.mark.slow
def test_without_gate_data_only_float32_is_searched(made, bundle):
    with running_server(str(bundle), "--compile", "--candidates", "torch", "--rounds", "1") as server:
        metadata = json.loads(get(server.url + "/v2/models/digits")[1])
        logs = server.logs()
    assert metadata["parameters"]["runtime"] == "torch/float32"
    assert "bf16 and int8 were not considered: no gate data was given" in logs


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--gate-data", "{root}/x.npy"), "add --compile"),
        (("--write-runtime",), "add --compile"),
        (("--compile", "--runtime", "torch"), "drop --runtime torch"),
        (("--compile", "--workers", "2"), "run `trainfer compile BUNDLE ...` once"),
        (
            ("--compile", "--gate-data", "{root}/x.npy", "--labels", "{root}/y5.npy"),
            "--gate-data has 48 inputs but --labels has 5",
        ),
        (("--compile", "--labels", "{root}/y.npy"), "need --gate-data"),
        (("--compile", "--gate-data", "{root}/x.npy", "--labels", "{root}/x.npy"), "expected integer class indices"),
    ],
    ids=["data-without-compile", "write-without-compile", "runtime", "workers", "label-count", "labels-only", "float"],
)
def test_bad_options_are_one_line_exit_2_before_serving(made, bundle, args, fragment):
    before = files(bundle)
    result = CliRunner().invoke(main, ["serve", str(bundle), *(a.format(root=made) for a in args)])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last and "Traceback" not in result.output, result.output
    assert files(bundle) == before


def test_the_python_side_refuses_a_runtime_beside_the_search_before_searching(bundle):
    from trainfer.errors import InputError
    from trainfer.server.model import load_model

    with pytest.raises(InputError, match="the start-up search chooses the runtime"):
        load_model("digits", bundle, runtime="torch", trust_factory=False, max_batch=4, search={})
