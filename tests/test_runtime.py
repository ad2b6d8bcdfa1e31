"""trainfer.compile: every runtime serves the deploy form verified against float64; auto picks among verified ones."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from click.testing import CliRunner

import trainfer
from trainfer.cli import main
from trainfer.models import digits_net
from trainfer.serve import runtime as rt
from trainfer.testing import TOLERANCE, randomize_batchnorm

onnxruntime = pytest.importorskip("onnxruntime")


def _model(width: int = 4):
    torch.manual_seed(0)
    return randomize_batchnorm(digits_net(width=width)).eval()


@pytest.fixture(scope="module")
def deployed():
    return trainfer.deploy(_model(), torch.randn(2, 1, 8, 8))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, deployed):
    path = tmp_path_factory.mktemp("runtime") / "bundle"
    return trainfer.save(deployed, path, task="classification", labels=[str(i) for i in range(10)])


def _rel_error(got, expected):
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("name", ["torch", "torch-channels-last", "onnxruntime"])
def test_each_named_runtime_serves_the_deploy_form_within_float32_tolerance(deployed, name):
    compiled = trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime=name)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = _float64(deployed)(x)
    assert _rel_error(compiled(x.float()), expected) <= TOLERANCE[torch.float32]
    record = compiled.record
    assert (record.runtime, record.dtype, record.chosen_by) == (name, "float32", "given")
    assert record.candidates[0].max_rel_error <= record.candidates[0].tolerance == TOLERANCE[torch.float32]


def _float64(model):
    import copy

    return copy.deepcopy(model).double().eval()


def test_a_training_form_is_deployed_first_and_left_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = trainfer.compile(model, torch.randn(2, 1, 8, 8), runtime="torch")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert _rel_error(compiled(x), model(x)) <= TOLERANCE[torch.float32]


def test_auto_measures_verified_candidates_and_picks_the_fastest(deployed):
    x = torch.randn(2, 1, 8, 8)
    compiled = trainfer.compile(deployed, x, dtype=("float32", "bfloat16"), gate_data=x, batch_sizes=(1, 4), rounds=3)
    record = compiled.record
    by_name = {c.name: c for c in record.candidates}
    assert record.chosen_by == "auto" and by_name[rt.REFERENCE].ratio == {"1": 1.0, "4": 1.0}
    served = [c for c in record.candidates if c.status == "ok"]
    assert {"torch/float32", "torch/bfloat16", "onnxruntime/float32"} <= {c.name for c in served}
    assert f"{record.runtime}/{record.dtype}" in {c.name for c in served}  # which one: the test below
    assert all(set(c.ratio) == {"1", "4"} and all(v > 0 for v in c.ratio.values()) for c in served)
    assert by_name["onnxruntime/bfloat16"].status == "unavailable"
    assert "float32 only" in by_name["onnxruntime/bfloat16"].reason
    assert by_name["torch/bfloat16"].tolerance == TOLERANCE[torch.bfloat16]
    assert record.machine["flags"].keys() >= {"avx2", "avx512_vnni", "amx_bf16"}
    assert record.threads["onnxruntime_intra_op"] == record.threads["measured_with"] >= 1
    assert "chosen:" in record.table() and "torch/bfloat16" in record.table()


@pytest.mark.parametrize("fast", ["torch", "torch-channels-last", "onnxruntime"])
def test_auto_never_picks_a_candidate_made_slower(deployed, monkeypatch, fast):
    """Known answer: every candidate but ``fast`` sleeps 100 ms a call, far above the model's own cost."""
    import time

    real = rt._engine

    def engine(runtime, dtype, source, threads):
        served = real(runtime, dtype, source, threads)
        if runtime == fast:
            return served

        def slowed(x):
            time.sleep(0.1)
            return served(x)

        return slowed

    monkeypatch.setattr(rt, "_engine", engine)
    candidates = ["torch", "torch-channels-last", "onnxruntime"]
    compiled = trainfer.compile(deployed, torch.randn(2, 1, 8, 8), candidates=candidates, batch_sizes=(1,), rounds=2)
    record = compiled.record
    assert (record.runtime, record.dtype, record.chosen_by) == (fast, "float32", "auto")
    slowest = {c.runtime: c.median_ms["1"] for c in record.candidates if c.status == "ok"}
    assert slowest[fast] < 100 <= min(ms for runtime, ms in slowest.items() if runtime != fast)


def test_a_candidate_that_computes_something_else_is_rejected_and_never_chosen(deployed, monkeypatch):
    real = rt._engine

    def engine(runtime, dtype, source, threads):
        served = real(runtime, dtype, source, threads)
        return (lambda x: served(x) * 1.01) if runtime == "torch-channels-last" else served

    monkeypatch.setattr(rt, "_engine", engine)
    compiled = trainfer.compile(
        deployed, torch.randn(2, 1, 8, 8), candidates=["torch", "torch-channels-last"], rounds=2
    )
    wrong = next(c for c in compiled.record.candidates if c.runtime == "torch-channels-last")
    assert wrong.status == "rejected" and "max rel error" in wrong.reason and wrong.ratio == {}
    assert compiled.record.runtime == "torch"
    with pytest.raises(trainfer.EquivalenceError, match="torch-channels-last/float32 cannot serve"):
        trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime="torch-channels-last")


def test_bfloat16_goes_through_the_accuracy_gate(deployed):
    x = torch.randn(64, 1, 8, 8)
    compiled = trainfer.compile(deployed, x[:2], runtime="torch", dtype="bfloat16", gate_data=x)
    gate = compiled.record.candidates[0].gate
    assert gate["ok"] and gate["samples"] == 64 and 0 < gate["max_rel_error"] <= TOLERANCE[torch.bfloat16]
    strict = trainfer.AccuracyGate(max_rel_error=1e-6)
    with pytest.raises(trainfer.EquivalenceError, match="max relative output error"):
        trainfer.compile(deployed, x[:2], runtime="torch", dtype="bfloat16", gate=strict, gate_data=x)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", ("float32", "bfloat16")])
def test_a_reduced_precision_without_gate_data_is_refused(deployed, dtype):
    with pytest.raises(trainfer.InputError, match="is a reduced precision, served only behind an accuracy gate"):
        trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime="torch", dtype=dtype)


def test_compile_names_every_option_in_its_signature():
    import inspect

    from trainfer.serve.gated import compile as gated_compile

    public = inspect.signature(trainfer.compile).parameters
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in public.values())
    assert {"batch_sizes", "rounds", "candidates", "gate", "gate_data", "threads", "calibration"} <= set(public)
    assert trainfer.compile is gated_compile
    for name, parameter in inspect.signature(rt.compile).parameters.items():  # the float search's defaults
        if name != "extra_candidates":  # the gated search's own hook, not the user's
            assert public[name].default == parameter.default, name


def test_record_round_trip_through_a_bundle_and_recorded_runtime(bundle, tmp_path):
    bundle = Path(shutil.copytree(bundle, tmp_path / "b"))  # the module's bundle keeps no record
    compiled = trainfer.compile(bundle, runtime="onnxruntime")
    path = rt.save_record(bundle, compiled.record)
    assert path.name == rt.RUNTIME_FILE and rt.read_record(bundle) == compiled.record
    again = trainfer.compile(bundle, runtime="recorded")
    assert (again.record.runtime, again.record.chosen_by) == ("onnxruntime", "given")
    predictor = trainfer.Predictor.load(bundle, runtime="recorded")
    eager = trainfer.Predictor.load(bundle, runtime="torch")
    x = torch.randn(6, 1, 8, 8)
    assert_results_close(predictor.predict(x), eager.predict(x), atol=1e-5)  # classes where margins are clear
    assert (predictor.model.record.runtime, eager.model.record.runtime) == ("onnxruntime", "torch")


def test_a_default_load_serves_what_runtime_json_records_as_the_server_does(bundle, tmp_path):
    """Predictor.load(bundle) and trainfer predict BUNDLE follow runtime.json (the same numbers as
    runtime="recorded" and as trainfer serve); runtime="torch" still serves the PyTorch model."""
    bundle = Path(shutil.copytree(bundle, tmp_path / "b"))
    rt.save_record(bundle, trainfer.compile(bundle, runtime="onnxruntime").record)
    x = torch.randn(5, 1, 8, 8)
    default, recorded = trainfer.Predictor.load(bundle), trainfer.Predictor.load(bundle, runtime="recorded")
    assert default.model.record.runtime == "onnxruntime"
    torch.testing.assert_close(default.model(x), recorded.model(x), rtol=0, atol=0)
    assert trainfer.Predictor.load(bundle, runtime="torch").model.record.runtime == "torch"
    np.save(tmp_path / "x.npy", x.numpy())
    args = ["predict", str(bundle), str(tmp_path / "x.npy"), "--format", "jsonl"]
    runner = CliRunner()
    runs = [runner.invoke(main, args + extra, catch_exceptions=False) for extra in ([], ["--runtime", "recorded"])]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout.splitlines()) == 5
    assert runs[0].stderr == f"serving {str(bundle)!r} on onnxruntime/float32, recorded in runtime.json\n"


def test_a_default_load_of_a_recorded_bundle_on_another_device_serves_the_pytorch_model_there(
    bundle, tmp_path, monkeypatch
):
    """The record's runtimes run on the CPU: naming device='cuda' serves the PyTorch model there; the
    default device='auto', even where it would pick CUDA, serves the record, as trainfer serve does
    (attacker round 5 H-1)."""
    from trainfer.serve import served_model

    bundle = Path(shutil.copytree(bundle, tmp_path / "b"))
    rt.save_record(bundle, trainfer.compile(bundle, runtime="torch").record)
    cuda_machine = {"auto": "cuda", "cuda": "cuda", "cpu": "cpu"}
    monkeypatch.setattr(served_model, "pick_device", lambda name: torch.device(cuda_machine[name]))
    assert served_model._engine(bundle, {"device": "cuda"}) == (None, {"device": "cuda"})
    for overrides in ({"device": "cpu"}, {"device": "auto"}, {}):
        _, left = served_model._engine(bundle, overrides)
        assert left["runtime"].runtime == "torch", overrides


def test_an_unavailable_device_is_refused_whatever_serves_the_bundle(bundle, tmp_path):
    """--device cuda on a machine without CUDA was accepted silently when a recorded runtime or an int8
    form served (attacker round 5 L-1); it is refused as for the PyTorch model."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    bundle = Path(shutil.copytree(bundle, tmp_path / "b"))
    rt.save_record(bundle, trainfer.compile(bundle, runtime="torch").record)
    for runtime in (None, "recorded", "onnxruntime"):
        with pytest.raises(trainfer.InputError, match="device 'cuda' is not available"):
            trainfer.Predictor.load(bundle, device="cuda", runtime=runtime)


@pytest.mark.parametrize("runtime", ["TORCH", "Inductor", " inductor"])
def test_a_refused_runtime_is_told_only_what_a_record_may_choose(runtime):
    """Attacker round 4 L-R1: the refusal listed inductor among the allowed choices, which a record never makes."""
    with pytest.raises(trainfer.BundleError) as refused:
        rt.RuntimeRecord.from_dict({"runtime": runtime, "dtype": "float32"})
    message = str(refused.value)
    assert f"runtime {runtime!r} with dtype 'float32' is not one a record may choose" in message
    assert "'inductor'" not in message and "'torch': ['float32', 'bfloat16', 'float16']" in message
    assert "'onnxruntime': ['float32', 'int8']" in message


def test_malformed_records_are_refused_with_a_clear_message(tmp_path, bundle):
    with pytest.raises(trainfer.BundleError, match="runtime 'pytorch-nightly'"):
        rt.RuntimeRecord.from_dict({"runtime": "pytorch-nightly", "dtype": "float32"})
    with pytest.raises(trainfer.BundleError, match="unexpected fields"):
        rt.RuntimeRecord.from_dict({"runtime": "torch", "dtype": "float32", "evil": 1})
    with pytest.raises(trainfer.BundleError, match="expected 'runtime' to be a string, got list"):
        rt.RuntimeRecord.from_dict({"runtime": ["torch"], "dtype": "float32"})
    with pytest.raises(trainfer.BundleError, match="no trainfer bundle"):
        rt.save_record(tmp_path, trainfer.compile(bundle, runtime="torch").record)
    with pytest.raises(trainfer.BundleError, match="records no runtime"):
        trainfer.compile(trainfer.save(_model(), tmp_path / "plain"), runtime="recorded")
    with pytest.raises(ValueError, match="runtime must be"):
        trainfer.compile(bundle, runtime="tensorrt")
    with pytest.raises(ValueError, match="dtype must be one of"):
        trainfer.compile(bundle, runtime="torch", dtype="int4")


def _forge_inductor_record(tmp_path, bundle):
    """A copy of ``bundle`` whose runtime.json (a genuine record, edited) chooses inductor/float32, as an attacker
    forges it: no gate is needed for float32, so only the rule on code-generating runtimes refuses it."""
    path = tmp_path / "forged"
    shutil.copytree(bundle, path)
    record = trainfer.compile(path, runtime="torch").record.to_dict()
    record["candidates"].append({**record["candidates"][0], "runtime": "inductor"})
    record["runtime"] = "inductor"
    (path / rt.RUNTIME_FILE).write_text(json.dumps(record))
    return path


@pytest.fixture
def no_codegen(monkeypatch):
    """Record every torch.compile call; serve the model as given instead of generating code."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    return calls


def test_a_record_choosing_a_code_generating_runtime_is_refused_at_load_before_any_code_is_made(
    tmp_path, bundle, no_codegen
):
    """M2: a downloaded bundle's runtime.json naming inductor made `trainfer serve` run a C++ compiler."""
    path = _forge_inductor_record(tmp_path, bundle)
    refused = f"invalid runtime record '{path / rt.RUNTIME_FILE}': a runtime record may choose only "
    with pytest.raises(trainfer.BundleError, match=re.escape(refused) + ".*'inductor' generates and compiles code"):
        rt.read_record(path)
    with pytest.raises(trainfer.BundleError, match="--runtime inductor"):
        trainfer.Predictor.load(path, runtime="recorded")
    from trainfer.server.model import load_model

    with pytest.raises(trainfer.BundleError, match="inductor"):  # `trainfer serve BUNDLE` follows runtime.json
        load_model("forged", path, runtime=None, trust_factory=False, max_batch=8)
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    result = CliRunner().invoke(main, ["predict", str(path), str(tmp_path / "x.npy"), "--runtime", "recorded"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: invalid runtime record") and rt.RUNTIME_FILE in result.output
    assert no_codegen == []


def test_the_operator_may_still_choose_a_code_generating_runtime_but_never_records_it(tmp_path, bundle, no_codegen):
    path = _forge_inductor_record(tmp_path, bundle)
    predictor = trainfer.Predictor.load(path, runtime="inductor")  # named by the operator, not read from the file
    assert predictor.model.record.runtime == "inductor" and len(no_codegen) == 1
    with pytest.raises(trainfer.BundleError, match="may choose only"):  # trainfer never writes what it refuses
        rt.save_record(path, predictor.model.record)


def test_predictor_runtime_matches_the_eager_predictor(deployed):
    labels = [str(i) for i in range(10)]
    eager = trainfer.Predictor(deployed, labels=labels, preprocess={"input_shape": [1, 8, 8]})
    served = trainfer.Predictor(deployed, labels=labels, preprocess={"input_shape": [1, 8, 8]}, runtime="onnxruntime")
    x = torch.randn(9, 1, 8, 8)
    expected, got = eager.predict(x, top_k=3), served.predict(x, top_k=3)
    assert_results_close(got, expected, atol=1e-5)  # probabilities within 1e-5, classes where margins are clear


def test_cli_predict_with_runtime(tmp_path, bundle):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    runner = CliRunner()
    args = ["predict", str(bundle), str(tmp_path / "x.npy"), "--format", "jsonl"]
    eager = runner.invoke(main, args, catch_exceptions=False)
    served = runner.invoke(main, [*args, "--runtime", "onnxruntime"], catch_exceptions=False)
    assert served.exit_code == 0
    records = [json.loads(line) for line in served.stdout.splitlines()]  # stderr names the runtime asked for
    assert len(records) == 4 and served.stderr.endswith("on onnxruntime/float32, runtime 'onnxruntime' asked for\n")
    assert_results_close(records, [json.loads(line) for line in eager.output.splitlines()], atol=1e-5)
    bad = runner.invoke(main, [*args, "--runtime", "tensorrt"])
    assert bad.exit_code == 2 and "tensorrt" in bad.output


@pytest.mark.skipif(not rt.openvino_precisions(), reason="openvino is not installed")
def test_openvino_serves_the_same_onnx_file(deployed):
    compiled = trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime="openvino")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert _rel_error(compiled(x), deployed(x)) <= TOLERANCE[torch.float32]


def test_an_openvino_that_cannot_be_imported_is_called_not_installed(deployed, monkeypatch):
    """Found on the path but failing to import, openvino read "CPU plugin reports no float32 ( only)"."""
    monkeypatch.setattr(rt, "openvino_precisions", lambda: ())  # what it returns when the import fails
    with pytest.raises(trainfer.TrainferError) as refused:
        trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime="openvino")
    message = str(refused.value)
    assert "openvino cannot be imported (not installed): pip install 'trainfer[openvino]'" in message, message
    assert "( only)" not in message


def test_machine_info_names_the_isa_flags():
    info = rt.machine_info()
    assert info["cores"] >= 1 and isinstance(info["cpu"], str)
    assert info["bf16_hardware"] == (info["flags"]["avx512_bf16"] or info["flags"]["amx_bf16"])
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.slow
def test_inductor_serves_the_deploy_form(deployed):
    compiled = trainfer.compile(deployed, torch.randn(2, 1, 8, 8), runtime="inductor", batch_sizes=(2,))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert _rel_error(compiled(x), deployed(x)) <= TOLERANCE[torch.float32]


def test_onnx_runtime_pool_threads_sleep_when_idle_so_they_never_take_the_cores_of_what_runs_next(deployed, tmp_path):
    """Spinning intra-op threads kept 2 cores busy after each run and slowed the next form of a
    paired measurement (OpenVINO's int8 at 2 threads: 1.2-3.6x its own time) or a server's event loop."""
    from trainfer.serve.engines import ort_engine

    path = tmp_path / "digits.onnx"
    trainfer.export(deployed, path, example_inputs=torch.randn(1, 1, 8, 8))
    engine = ort_engine(path, {"input": {"shape": [1, 1, 8, 8], "dtype": "float32"}}, 2)
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
