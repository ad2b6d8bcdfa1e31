"""compile with a gate and data: bf16 and int8 gated, the paired measurement decides, runtime.json records it."""

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from search_hook import hooked_measure
from time_limit import time_limit

import trainfer
from trainfer.errors import BundleError
from trainfer.models import digits_net
from trainfer.serve import runtime as rt
from trainfer.serve.gated import save_compiled
from trainfer.testing import randomize_batchnorm

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
OPEN = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)
#: The int8 runtime the round trip records: OpenVINO's placement where it is installed.
INT8 = "openvino" if rt.openvino_precisions() else "onnxruntime"


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    model = randomize_batchnorm(digits_net(width=4)).eval()
    deployed = trainfer.deploy(model, torch.randn(2, 1, 8, 8))
    x, calibration = torch.randn(48, 1, 8, 8), torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        labels = deployed(x).argmax(1)
    return {"deployed": deployed, "x": x, "labels": labels, "calibration": calibration}


def _compile(target, data, gate, **options):
    return trainfer.compile(
        target,
        data["x"][:2],
        gate=gate,
        gate_data=(data["x"], data["labels"]),
        calibration=data["calibration"],
        candidates=sorted({"torch", "onnxruntime", INT8}),
        batch_sizes=(1, 4),
        rounds=3,
        **options,
    )


def test_int8_candidates_come_only_from_the_runtimes_candidates_names(data):
    compiled = trainfer.compile(
        data["deployed"],
        data["x"][:2],
        gate=trainfer.AccuracyGate(max_rel_error=1e-9),
        gate_data=(data["x"], data["labels"]),
        calibration=data["calibration"],
        candidates=["torch"],
        batch_sizes=(1,),
        rounds=1,
    )
    assert {c.runtime for c in compiled.record.candidates} == {"torch"}
    assert "int8" not in {c.dtype for c in compiled.record.candidates}


def _only_fast(monkeypatch, fast):
    """Every engine but ``fast`` sleeps ``search_hook.SLOW_S`` per call while the chooser measures."""
    monkeypatch.setattr(rt, "_measure", hooked_measure(rt._measure, None, fast))


def test_a_gate_that_refuses_int8_and_bf16_leaves_float32_chosen(data):
    compiled = _compile(data["deployed"], data, trainfer.AccuracyGate(max_rel_error=1e-9))
    record = compiled.record
    by_name = {c.name: c for c in record.candidates}
    assert record.dtype == "float32" and record.chosen_by == "auto"
    for name in {"onnxruntime/int8", f"{INT8}/int8"}:
        assert by_name[name].status == "rejected" and "trainfer.quantize" in by_name[name].reason
        assert by_name[name].ratio == {}
    assert by_name["onnxruntime/int8"].gate["ok"] is False
    bf16 = by_name["torch/bfloat16"]
    assert bf16.status == "rejected" and "max relative output error" in bf16.reason and not bf16.gate["ok"]
    assert compiled.quantized is None


@pytest.mark.parametrize("fast", [f"{INT8}/int8", "torch/bfloat16", "onnxruntime/float32"])
def test_the_choice_among_passing_candidates_is_the_one_the_paired_run_finds_fastest(data, monkeypatch, fast):
    _only_fast(monkeypatch, fast)
    compiled = _compile(data["deployed"], data, OPEN)
    record = compiled.record
    passing = [c for c in record.candidates if c.status == "ok"]
    assert {"onnxruntime/int8", f"{INT8}/int8", "torch/bfloat16", "torch/float32"} <= {c.name for c in passing}
    assert all(c.gate["ok"] for c in passing if c.dtype != "float32")
    assert f"{record.runtime}/{record.dtype}" == fast  # every other candidate slept SLOW_S per call
    chosen = next(c for c in passing if c.name == fast)
    assert chosen.score == min(c.score for c in passing) and all(set(c.median_ms) == {"1", "4"} for c in passing)
    with torch.no_grad():
        expected = data["deployed"](data["x"])
    agreement = (compiled(data["x"]).argmax(1) == expected.argmax(1)).double().mean()
    assert agreement >= chosen.gate["agreement"] - 1e-9 if chosen.gate else agreement == 1


def test_a_timing_flagged_as_untrusted_records_float32_and_says_why(data, monkeypatch, tmp_path):
    bundle = trainfer.save(data["deployed"], tmp_path / "b", task="classification", labels=list("0123456789"))
    fast = hooked_measure(rt._measure, None, f"{INT8}/int8")  # int8 measured far faster than the rest

    def flagged(engines, records, source, options):
        fast(engines, records, source, options)
        options["warnings"].append("batch 1: latencies measured on a starved or busy machine (a test's)")

    monkeypatch.setattr(rt, "_measure", flagged)
    compiled = _compile(bundle, data, OPEN)
    assert compiled.record.dtype == "float32" and compiled.quantized is None
    assert f"{INT8}/int8 measured" in compiled.record.choice and "flagged as untrusted" in compiled.record.choice
    save_compiled(bundle, compiled)
    assert json.loads((bundle / rt.RUNTIME_FILE).read_text())["choice"] == compiled.record.choice


def test_an_int8_choice_round_trips_through_the_bundle_and_is_what_serves(data, monkeypatch, tmp_path):
    bundle = trainfer.save(data["deployed"], tmp_path / "b", task="classification", labels=list("0123456789"))
    _only_fast(monkeypatch, f"{INT8}/int8")
    compiled = _compile(bundle, data, OPEN)
    assert (compiled.record.runtime, compiled.record.dtype) == (INT8, "int8")
    save_compiled(bundle, compiled)
    assert rt.read_record(bundle) == compiled.record
    saved = {(c["runtime"], c["dtype"]): c for c in json.loads((bundle / rt.RUNTIME_FILE).read_text())["candidates"]}
    assert saved[INT8, "int8"]["gate"]["ok"] and saved[INT8, "int8"]["median_ms"].keys() == {"1", "4"}
    predictor = trainfer.Predictor.load(bundle, runtime="recorded")
    assert (predictor.model.record.runtime, predictor.model.record.dtype) == (INT8, "int8")
    assert trainfer.Predictor.load(bundle).model.record.runtime == INT8  # the int8 file's own target
    x = data["x"][:8]
    assert torch.allclose(predictor.model(x), compiled(x), atol=1e-6)
    pytest.importorskip("fastapi")
    from trainfer.server.model import load_model

    served = load_model("b", bundle, runtime=None, trust_factory=False, max_batch=4)
    assert served.predictor.model.record.dtype == "int8"  # the server serves what was recorded


def _tampered(bundle, tmp_path, change):
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    file = copy / rt.RUNTIME_FILE
    data = json.loads(file.read_text())
    file.write_text(change(data) if callable(change) else change)
    return copy


def _reduced(record, dtype, gate_ok, runtime=None, **figures):
    """The record's choice forged into ``dtype`` (on ``runtime``), with no gate (``gate_ok`` None) or a verdict
    (``figures`` replace its fields: by default 8 samples agreeing at 50 % against a 0.99 minimum)."""
    chosen = next(c for c in record["candidates"] if (c["runtime"], c["dtype"]) == (record["runtime"], record["dtype"]))
    runtime = runtime or chosen["runtime"]
    verdict = None
    if gate_ok is not None:
        limits = {"min_agreement": 0.99, "max_accuracy_drop": 0.005, "max_rel_error": None}
        verdict = {"gate": limits, "samples": 8, "max_rel_error": 0.5, "agreement": 0.5, "reference_accuracy": None,
                   "candidate_accuracy": None, "accuracy_drop": None, "ok": gate_ok, **figures}  # fmt: skip
    chosen.update(runtime=runtime, dtype=dtype, gate=verdict)
    return {**record, "runtime": runtime, "dtype": dtype}


ACCURACIES = {"reference_accuracy": 0.9, "candidate_accuracy": 0.5}
ERROR_LIMIT = {"min_agreement": None, "max_accuracy_drop": None, "max_rel_error": 0.01}


def test_a_reduced_choice_whose_verdict_its_figures_bear_out_is_served(data, tmp_path):
    """The control for the contradicting verdicts below: the same forged bf16 choice, its figures passing."""
    bundle = trainfer.save(data["deployed"], tmp_path / "b", task="classification", labels=list("0123456789"))
    rt.save_record(bundle, trainfer.compile(bundle, runtime="auto", candidates=["torch"], rounds=1).record)
    verdict = {"agreement": 1.0, **ACCURACIES, "candidate_accuracy": 0.9, "accuracy_drop": 0.0}
    copy = _tampered(bundle, tmp_path, lambda r: json.dumps(_reduced(r, "bfloat16", True, **verdict)))
    assert trainfer.Predictor.load(copy).model.record.dtype == "bfloat16"


def _reject_the_choice(record):
    chosen = next(c for c in record["candidates"] if (c["runtime"], c["dtype"]) == (record["runtime"], record["dtype"]))
    chosen["status"] = "rejected"
    return json.dumps(record)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_reject_the_choice, "contradicts itself"),
        (lambda r: json.dumps({**r, "candidates": [{**r["candidates"][0], "ratio": {"1": "fast"}}]}), "ratio.1"),
        (lambda r: json.dumps({**r, "candidates": r["candidates"] * 70}), "at most 64"),
        (lambda r: json.dumps({**r, "batch_sizes": [0]}), "batch_sizes.0"),
        (lambda r: json.dumps({**r, "chosen_by": "me"}), "chosen_by"),
        (lambda r: json.dumps(r) + " " * 2**20, "larger than 1048576 bytes"),
        (lambda r: json.dumps(_reduced(r, "bfloat16", None)), "reduced precision without"),
        (lambda r: json.dumps(_reduced(r, "int8", None, runtime="onnxruntime")), "reduced precision without"),
        (lambda r: json.dumps(_reduced(r, "bfloat16", False)), "reduced precision without"),
        (
            lambda r: json.dumps(_reduced(r, "bfloat16", True, samples=0, agreement=0.0)),
            'contradicts itself: "ok" is true, but its figures fail the gate: measured on no samples; '
            "class agreement 0.00% < required 99.00%",
        ),
        (lambda r: json.dumps(_reduced(r, "bfloat16", True)), "class agreement 50.00% < required 99.00%"),
        (
            lambda r: json.dumps(_reduced(r, "bfloat16", True, agreement=1.0, **ACCURACIES, accuracy_drop=0.4)),
            "accuracy drop 40.00 points > allowed 0.50",
        ),
        (
            lambda r: json.dumps(_reduced(r, "bfloat16", True, agreement=1.0, **ACCURACIES, accuracy_drop=0.0)),
            "accuracy_drop 0.0 is not reference_accuracy - candidate_accuracy",
        ),
        (
            lambda r: json.dumps(_reduced(r, "bfloat16", True, agreement=1.0, gate=ERROR_LIMIT, max_rel_error=0.5)),
            "max relative output error 5.000e-01 > allowed 1e-02",
        ),
    ],
    ids=[
        "chosen-rejected",
        "timing-not-a-number",
        "too-many-candidates",
        "batch-0",
        "chooser",
        "oversized",
        "bf16-ungated",
        "int8-ungated",
        "bf16-gate-failed",
        "bf16-passed-on-no-samples",
        "bf16-passed-below-its-agreement",
        "bf16-passed-over-its-accuracy-drop",
        "bf16-drop-not-its-accuracies",
        "bf16-passed-over-its-error",
    ],
)
def test_a_tampered_runtime_record_is_refused_with_a_clear_error(data, tmp_path, change, message):
    bundle = trainfer.save(data["deployed"], tmp_path / "b", task="classification", labels=list("0123456789"))
    rt.save_record(bundle, trainfer.compile(bundle, runtime="auto", candidates=["torch"], rounds=1).record)
    copy = _tampered(bundle, tmp_path, change)
    with pytest.raises(trainfer.BundleError, match=message):
        trainfer.Predictor.load(copy, runtime="recorded")


def test_calibration_needs_gate_data_and_auto(data):
    with pytest.raises(trainfer.InputError, match="needs gate_data"):
        trainfer.compile(data["deployed"], data["x"][:2], calibration=data["calibration"])
    with pytest.raises(trainfer.InputError, match="runtime='auto'"):
        trainfer.compile(data["deployed"], data["x"][:2], runtime="torch", gate_data=data["x"], calibration=data["x"])


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_int8_file_places_its_quantizers_for_its_runtime(data, runtime):
    """ONNX Runtime's file quantizes conv outputs (it fuses them into QLinearConv); OpenVINO's only conv inputs."""
    import onnx

    if runtime == "openvino" and not rt.openvino_precisions():
        pytest.skip("openvino is not installed")
    int8 = trainfer.quantize(
        data["deployed"], data["calibration"], validation=data["x"], gate=OPEN, equalize=False, runtime=runtime
    )
    graph = onnx.load_from_string(int8.onnx_bytes).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    quantized_outputs = [n for n in graph.node if n.op_type == "QuantizeLinear" and producer.get(n.input[0]) == "Conv"]
    assert (len(quantized_outputs) > 0) == (runtime == "onnxruntime")
    assert (producer[graph.output[0].name] == "Gemm") == (runtime == "openvino")  # logits left in float
    assert int8.report.settings["runtime"] == runtime
    with torch.no_grad():
        expected = data["deployed"](data["x"])
    assert float((int8(data["x"]) - expected).abs().max() / expected.abs().max()) < 0.1


def test_a_reduced_precision_choice_without_a_gate_is_never_written(data, tmp_path):
    bundle = tmp_path / "b"
    trainfer.save(data["deployed"], bundle, example_inputs=data["x"][:1])
    x = data["x"][:2]
    compiled = trainfer.compile(data["deployed"], x, runtime="torch", dtype="bfloat16", gate_data=x, rounds=1)
    assert compiled.record.dtype == "bfloat16"
    compiled.record.candidates[0].gate = None  # a record whose choice was not gated (compile refuses to make one)
    refused = "to be written: the choice torch/bfloat16 is a reduced precision without .* compile it with gate_data"
    with pytest.raises(BundleError, match=refused):
        rt.save_record(bundle, compiled.record)
    assert not (bundle / rt.RUNTIME_FILE).exists()


#: The files an int8 choice adds to a bundle (``save_compiled``), and the name a removal renames the record to.
INT8_FILES = {"quantized.onnx", "probes.safetensors", "quantization.json"}


@pytest.fixture(scope="module")
def int8_bundle(data, tmp_path_factory):
    """A bundle whose runtime.json chose int8 (save_compiled wrote the int8 form), and its float bundle's files."""
    bundle = trainfer.save(data["deployed"], tmp_path_factory.mktemp("int8") / "b", task="classification")
    float_files = {p.name for p in bundle.iterdir()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rt, "_measure", hooked_measure(rt._measure, None, f"{INT8}/int8"))
        save_compiled(bundle, _compile(bundle, data, OPEN))
    assert INT8_FILES <= {p.name for p in bundle.iterdir()}
    return bundle, float_files


def _copy(int8_bundle, tmp_path):
    bundle, float_files = int8_bundle
    return Path(shutil.copytree(bundle, tmp_path / "b")), float_files


def _save_float32(bundle):
    """A float32 choice recorded in ``bundle`` by ``save_compiled``."""
    compiled = trainfer.compile(bundle, runtime="auto", candidates=["torch"], rounds=1)
    assert compiled.record.dtype == "float32"
    return save_compiled(bundle, compiled)


def _serves_float32(bundle):
    predictor = trainfer.Predictor.load(bundle, runtime="recorded")
    assert predictor.model.record.dtype == "float32" == rt.read_record(bundle).dtype
    predictor.predict(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("made_by", [True, False], ids=["made_by", "record-before-made_by"])
def test_a_float32_choice_after_an_int8_one_removes_the_int8_form_and_only_it(int8_bundle, tmp_path, made_by):
    """An int8 record without made_by (written before it existed) is compile's when runtime.json chose int8."""
    bundle, float_files = _copy(int8_bundle, tmp_path)
    if not made_by:
        record = json.loads((bundle / "quantization.json").read_text())
        del record["made_by"]
        (bundle / "quantization.json").write_text(json.dumps(record))
    (bundle / "notes.txt").write_text("mine")
    (bundle / "quantized.onnx.orig").write_bytes((bundle / "quantized.onnx").read_bytes())
    _save_float32(bundle)
    assert {p.name for p in bundle.iterdir()} == float_files | {rt.RUNTIME_FILE, "notes.txt", "quantized.onnx.orig"}
    _serves_float32(bundle)
    assert trainfer.Predictor.load(bundle).model.record.dtype == "float32"  # a default load follows the record
    assert (bundle / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("crash_in", ["retire_int8_form", "sha256"], ids=["before-rename", "after-rename"])
def test_a_crash_after_runtime_json_is_written_leaves_a_loadable_bundle_the_next_compile_cleans(
    int8_bundle, tmp_path, monkeypatch, crash_in
):
    from trainfer.serve import int8_form

    bundle, float_files = _copy(int8_bundle, tmp_path)

    def crash(*args):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(int8_form, crash_in, crash)
        with pytest.raises(KeyboardInterrupt):
            _save_float32(bundle)
    _serves_float32(bundle)
    trainfer.Predictor.load(bundle).predict(torch.rand(2, 1, 8, 8))  # the default load works in between too
    _save_float32(bundle)
    assert {p.name for p in bundle.iterdir()} == float_files | {rt.RUNTIME_FILE}


def test_a_float32_choice_leaves_int8_files_trainfer_cannot_prove_its_own(int8_bundle, tmp_path):
    """A trainfer quantize bundle's own int8 form, a changed file, a link out of the bundle: all kept."""
    bundle, _ = _copy(int8_bundle, tmp_path)
    record = json.loads((bundle / "quantization.json").read_text())
    (bundle / "quantization.json").write_text(json.dumps({**record, "made_by": "trainfer quantize"}))
    (bundle / rt.RUNTIME_FILE).unlink()
    _save_float32(bundle)
    assert INT8_FILES <= {p.name for p in bundle.iterdir()}

    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / "quantized.onnx").read_bytes())
    (bundle / "quantized.onnx").unlink()
    (bundle / "quantized.onnx").symlink_to(outside)
    (bundle / "probes.safetensors").write_bytes(b"changed by hand")
    (bundle / "quantization.json").write_text(json.dumps(record))  # compile's again: it is removed
    _save_float32(bundle)
    assert outside.is_file() and (bundle / "quantized.onnx").is_symlink()
    assert (bundle / "probes.safetensors").read_bytes() == b"changed by hand"
    assert not (bundle / "quantization.json").exists()


def test_an_int8_file_swapped_for_a_fifo_while_it_is_retired_is_kept_never_waited_on(
    int8_bundle, tmp_path, monkeypatch
):
    """The retirement looked at quantized.onnx (a regular file), then opened it again by name to hash it: a
    FIFO put there in between blocked compile forever. It is opened without blocking, and kept (not trainfer's)."""
    from trainfer.serve import int8_form

    bundle, float_files = _copy(int8_bundle, tmp_path)
    file, digest = bundle / "quantized.onnx", int8_form.sha256

    def swap_then_digest(path):
        if Path(path) == file:
            file.unlink()
            os.mkfifo(file)
        return digest(path)

    monkeypatch.setattr(int8_form, "sha256", swap_then_digest)
    with time_limit(60):
        _save_float32(bundle)
    assert {p.name for p in bundle.iterdir()} == float_files | {rt.RUNTIME_FILE, "quantized.onnx"}
    assert stat.S_ISFIFO(os.lstat(file).st_mode)


def test_a_float32_choice_refuses_a_quantization_json_that_is_not_a_regular_file(int8_bundle, tmp_path):
    """Deciding whether to retire an int8 form skipped a FIFO quantization.json quietly; a load refuses it."""
    bundle, _ = _copy(int8_bundle, tmp_path)
    record = (bundle / rt.RUNTIME_FILE).read_bytes()
    (bundle / "quantization.json").unlink()
    os.mkfifo(bundle / "quantization.json")
    with time_limit(60), pytest.raises(BundleError, match="quantization.json' is a pipe: expected a regular file"):
        _save_float32(bundle)
    assert (bundle / rt.RUNTIME_FILE).read_bytes() == record  # refused before anything is written


def test_a_quantized_bundle_compiled_to_float32_serves_one_form_in_predict_and_serve(data, tmp_path):
    """trainfer quantize, then trainfer compile --candidates torch: runtime.json records torch/float32 and
    quantize's own int8 form stays (compile removes only its own); the default load (trainfer predict)
    and the server both follow runtime.json: the same form, with the same numbers."""
    pytest.importorskip("fastapi")
    from trainfer.server.model import load_model

    quantized = trainfer.quantize(
        data["deployed"], data["calibration"], validation=data["x"], gate=OPEN, equalize=False
    )
    bundle = quantized.save(tmp_path / "dq", task="classification")
    assert not isinstance(trainfer.Predictor.load(bundle).model, torch.nn.Module)  # no runtime.json: int8
    _named_device_serves_the_pytorch_model(bundle)
    _save_float32(bundle)
    assert INT8_FILES <= {p.name for p in bundle.iterdir()}
    predicted = trainfer.Predictor.load(bundle)
    served = load_model("dq", bundle, runtime=None, trust_factory=False, max_batch=4).predictor
    for predictor in (predicted, served):  # the float32 deploy form, in PyTorch, as runtime.json records
        assert (predictor.model.record.runtime, predictor.model.record.dtype) == ("torch", "float32")
    x = data["x"][:8]
    torch.testing.assert_close(predicted.model(x), served.model(x), rtol=0, atol=0)
    assert [r.to_record() for r in predicted.predict(x)] == [r.to_record() for r in served.predict(x)]


@pytest.mark.parametrize(
    ("calibration", "candidates", "warned"),
    [
        ("x", None, True),  # the gate inputs themselves
        ("x copy", None, True),  # equal inputs, read twice (--calibration naming --gate-data's file)
        ("calibration", None, False),  # other inputs
        ("x", ["torch", "onnxruntime"], True),  # one int8 candidate is enough
        ("x", ["torch"], False),  # no int8 candidate: nothing is calibrated
    ],
)
def test_int8_calibrated_on_the_gate_inputs_warns_as_quantize_does(data, monkeypatch, calibration, candidates, warned):
    from trainfer.serve import gated

    monkeypatch.setattr(gated, "compile_float", lambda *args, **options: None)  # the warning comes before the search
    inputs = {"x": data["x"], "x copy": data["x"].clone(), "calibration": data["calibration"]}[calibration]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainfer.compile(
            data["deployed"], gate_data=(data["x"], data["labels"]), calibration=inputs, candidates=candidates
        )
    said = [str(w.message) for w in caught if "overstates agreement on new data" in str(w.message)]
    assert len(said) == warned and all(s.startswith("compile: the int8 candidates are calibrated on") for s in said)


def _named_device_serves_the_pytorch_model(bundle):
    """A named device other than the CPU, without a runtime, serves the PyTorch model there, int8 form or
    not (attacker round 6 M-1: an int8 form served on the CPU instead); "auto" still serves the int8 form."""
    from trainfer.serve import served_model

    cuda_machine = {"auto": "cuda", "cuda": "cuda", "cpu": "cpu"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(served_model, "pick_device", lambda name: torch.device(cuda_machine[name]))
        assert served_model._engine(bundle, {"device": "cuda"}) == (None, {"device": "cuda"})
        engine, _ = served_model._engine(bundle, {"device": "auto"})
    assert engine is not None and engine.record.dtype == "int8"
