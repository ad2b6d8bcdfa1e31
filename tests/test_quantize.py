"""trainfer.quantize: gated int8 digits, sensitivity-ordered float fallback, refusal, bundle round trip, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from agreement import assert_same_classes
from click.testing import CliRunner
from torch import nn

import trainfer
from trainfer.cli import main
from trainfer.demo import data
from trainfer.demo.train import fit
from trainfer.models import digits_net
from trainfer.numerics import TOLERANCE, relative_error
from trainfer.serve.bundle_format import bundle_files
from trainfer.serve.calibration import calibration_inputs
from trainfer.serve.int8_form import QUANTIZATION_FILE, QUANTIZED_FILE
from trainfer.serve.runtime import save_record
from trainfer.serve.sensitivity import _sqnr_db
from trainfer.serve.served_checks import PROBES_FILE

onnx = pytest.importorskip("onnx")  # the optional onnx extra: the whole module needs it
pytest.importorskip("onnxruntime")
EPOCHS = 8


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits_net trained briefly (one thread, seeded), its deploy form as a bundle, and the splits."""
    torch.manual_seed(0)
    model = digits_net(width=32)
    loaders = data.loaders(64, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    fit(model, loaders.train, loaders.val, EPOCHS, optimizer, scheduler=scheduler, progress=False)
    parts = data.splits()
    test = parts["test"]
    deployed = trainfer.deploy(model.eval(), data.normalize(test.pixels[:8]))
    bundle = tmp_path_factory.mktemp("quantize") / "float"
    trainfer.save(deployed, bundle, task="classification", labels=data.LABELS, preprocess=data.preprocess_spec())
    return {
        "deployed": deployed,
        "bundle": bundle,
        "train": parts["train"],
        "test": test,
        "x": data.normalize(test.pixels),
        "y": test.labels,
    }


@pytest.fixture(scope="module")
def int8(digits):
    train = data.normalize(digits["train"].pixels)
    return trainfer.quantize(digits["bundle"], train, validation=digits["x"], labels=digits["y"])


def test_int8_digits_pass_the_default_gate(digits, int8):
    gate = int8.report.gate
    assert gate.ok and gate.gate == trainfer.AccuracyGate()
    assert gate.agreement >= 0.99 and gate.accuracy_drop <= 0.005 and gate.samples == len(digits["y"])
    logits = int8(digits["x"])
    accuracy = float((logits.argmax(1) == digits["y"]).double().mean())
    assert accuracy == pytest.approx(gate.candidate_accuracy) and accuracy > 0.9
    proto = onnx.load_from_string(int8.onnx_bytes)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 4 - len([n for n in int8.report.float_layers if n != "head.3"])


def test_sensitivity_report_ranks_every_layer_with_its_weight_ranges(int8):
    ranking = int8.report.sensitivity
    assert [layer.name for layer in ranking] != [] and len(ranking) == 5
    assert sorted(layer.name for layer in ranking) == sorted(
        ["stage1.0.reparam", "stage1.1.reparam", "stage2.0.reparam", "stage2.1.reparam", "head.3"]
    )
    assert [layer.sqnr_db for layer in ranking] == sorted(layer.sqnr_db for layer in ranking)
    for layer in ranking:
        low, median, high = layer.channel_range
        assert 0 < low <= median <= high and 10 < layer.sqnr_db < 80 and layer.outlier_ratio >= 1
    assert "weight range per channel" in str(int8.report)


def test_an_sqnr_whose_ratio_underflows_is_its_value_in_db_not_a_log10_error():
    """A zero output against a candidate of 1e20: signal / noise (1e-300 / 4e40) underflows to 0, whose log10
    raised ValueError; the SQNR is the difference of the logarithms, finite, and +inf only without noise."""
    zero, far = torch.zeros(4), torch.full((4,), 1e20)
    assert 1e-300 / float(far.double().pow(2).sum()) == 0.0  # the ratio the old formula took the log of
    assert _sqnr_db(zero, far) == pytest.approx(10 * (-300 - math.log10(4e40)))
    assert _sqnr_db(far, far) == math.inf and _sqnr_db(far, 2 * far) == pytest.approx(0.0)


def test_fallback_keeps_the_most_sensitive_layers_in_float_until_the_gate_passes(digits):
    """An int8 form cannot meet a 1e-5 output error: every layer falls back, in sensitivity order."""
    train = data.normalize(digits["train"].pixels[:256])
    gate = trainfer.AccuracyGate(max_rel_error=1e-5)
    with pytest.warns(UserWarning, match="no validation data, so the accuracy gate measures on the calibration"):
        result = trainfer.quantize(digits["deployed"], train, gate=gate, equalize=False, max_float_layers=5)
    ranking = [layer.name for layer in result.report.sensitivity]
    assert result.report.float_layers == ranking and result.report.gate.ok
    assert len(result.report.attempts) == 6 and result.report.attempts[-1].startswith("plain, 5 layer(s) in float")


def test_the_gate_refuses_with_a_clear_message_when_fallback_is_exhausted(digits):
    train = data.normalize(digits["train"].pixels[:256])
    strict = trainfer.AccuracyGate(max_rel_error=1e-6)
    with pytest.raises(trainfer.QuantizationError, match="no int8 form passes the gate with at most 0 of 5") as caught:
        trainfer.quantize(digits["deployed"], train, gate=strict, max_float_layers=0)
    report = caught.value.report
    assert not report.gate.ok and "max relative output error" in report.gate.failures()[0]
    assert len(report.attempts) == 2  # the plain and the equalized form, no fallback allowed


def test_bundle_round_trip_serves_the_int8_form_without_pickle(digits, int8, tmp_path):
    path = int8.save(tmp_path / "int8")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["manifest.json", "model.safetensors", QUANTIZED_FILE, QUANTIZATION_FILE, PROBES_FILE]
    )
    record = json.loads((path / QUANTIZATION_FILE).read_text())
    assert record["report"]["gate"]["ok"] and record["report"]["settings"]["format"] == "QDQ"
    served = trainfer.Predictor.load(path)
    assert isinstance(served.model, trainfer.CompiledModel) and served.model.record.dtype == "int8"
    x = digits["x"][:40]
    expected = int8(x)
    assert relative_error(served.model(x), expected) <= TOLERANCE[torch.float32]  # the same int8 file and session
    raw = digits["test"].pixels[:40].float() * data.PIXEL_SCALE  # what an image file loads as: predict normalizes it
    classes = torch.tensor([r.index for r in served.predict(raw)])
    assert_same_classes(torch.nn.functional.one_hot(classes, len(data.LABELS)), expected)
    assert served.labels == data.LABELS
    float_form = trainfer.Predictor.load(path, runtime="torch")  # the float weights the int8 form came from
    assert (float_form.model.record.runtime, float_form.model.record.dtype) == ("torch", "float32")
    with torch.no_grad():
        reference = digits["deployed"](x)
    assert relative_error(float_form.model(x), reference) <= TOLERANCE[torch.float32]  # the same float32 weights


def test_every_file_trainfer_writes_into_a_bundle_is_a_bundle_file_and_a_rewrite_keeps_the_users_files(int8, tmp_path):
    """What check_replaceable lets a rewrite delete (bundle_files) covers all trainfer writes; nothing else goes."""
    path = int8.save(tmp_path / "int8")
    save_record(path, trainfer.compile(path, runtime="torch").record)
    assert {entry.name for entry in path.iterdir()} <= bundle_files()
    assert int8.save(path) == path  # a bundle holding only bundle files is rewritten
    (path / "NOTES.txt").write_text("notes")
    with pytest.raises(trainfer.BundleError, match="it also holds 'NOTES.txt', which are not files of a trainfer"):
        int8.save(path)
    assert (path / "NOTES.txt").read_text() == "notes"


def test_a_corrupted_int8_file_is_refused(int8, tmp_path):
    path = int8.save(tmp_path / "int8")
    data_bytes = bytearray((path / QUANTIZED_FILE).read_bytes())
    data_bytes[-1] ^= 1
    (path / QUANTIZED_FILE).write_bytes(bytes(data_bytes))
    with pytest.raises(trainfer.BundleError, match="does not match quantization.json"):
        trainfer.Predictor.load(path)


def test_calibration_from_a_directory_of_images_is_preprocessed_like_prediction(digits, tmp_path):
    pixels = digits["test"].pixels[:5]
    for index, image in enumerate(pixels):
        data.save_png(image, tmp_path / "images" / f"{index}.png", upscale=1)
    manifest = trainfer.serve.bundle.read_manifest(digits["bundle"])
    loaded = calibration_inputs(tmp_path / "images", manifest)
    assert torch.equal(loaded, data.normalize(pixels))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no image or .npy files"):
        calibration_inputs(tmp_path / "nothing", manifest)


def test_cli_quantize_then_predict(digits, tmp_path):
    # .npy inputs are raw values after pixel scaling (images alone are scaled on reading)
    np.save(tmp_path / "calib.npy", (digits["train"].pixels[:300].float() * data.PIXEL_SCALE).numpy())
    np.save(tmp_path / "test.npy", (digits["test"].pixels.float() * data.PIXEL_SCALE).numpy())
    np.save(tmp_path / "labels.npy", digits["test"].labels.numpy())
    runner = CliRunner()
    out = tmp_path / "int8"
    common = ["quantize", str(digits["bundle"]), "--calibration", str(tmp_path / "calib.npy")]
    labelled = ["--validation", str(tmp_path / "test.npy"), "--labels", str(tmp_path / "labels.npy")]
    result = runner.invoke(main, [*common, *labelled, "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "gate passed" in result.output and (out / QUANTIZED_FILE).is_file()
    predicted = runner.invoke(main, ["predict", str(out), str(tmp_path / "test.npy"), "--format", "jsonl"])
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]  # stderr names the int8 form serving
    assert predicted.stderr == f"serving {str(out)!r} on onnxruntime/int8\n"
    accuracy = np.mean([row["index"] == label for row, label in zip(rows, digits["test"].labels.tolist())])
    assert len(rows) == len(digits["test"]) and accuracy > 0.9
    refused = runner.invoke(
        main, [*common, "--max-rel-error", "1e-7", "--max-float-layers", "0", "-o", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2 and refused.output.startswith("error: no int8 form passes the gate")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("label", [-4, 3])
def test_the_gate_refuses_labels_no_class_can_match(label):
    """A label outside 0..C-1 is missed by both forms alike: it would pass any accuracy drop."""
    from trainfer.errors import InputError
    from trainfer.serve.gate import gate_report

    reference = torch.randn(4, 3)
    labels = torch.tensor([0, 1, label, 2])
    with pytest.raises(InputError, match=rf"labels must be class indices in 0\.\.2 \(3 classes\); got {label}"):
        gate_report(reference, reference.clone(), labels)
    assert gate_report(reference, reference.clone(), torch.tensor([0, 1, 2, 2])).agreement == 1.0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_candidate_whose_outputs_hold_nan_or_inf_fails_the_gate_without_an_error_limit(bad):
    """Its max_rel_error is infinite: with no limit on the error (the default) it passed on its agreement,
    and a record of ``"max_rel_error": Infinity`` marked ``"ok": true`` was served."""
    from trainfer.serve.gate import AccuracyGate, gate_report

    reference = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    candidate = reference.clone()
    candidate[0, 0] = bad  # the argmax of row 0 may still agree: agreement alone passes
    report = gate_report(reference, candidate, gate=AccuracyGate(min_agreement=0.5, max_accuracy_drop=None))
    assert report.max_rel_error == float("inf") and not report.ok
    assert report.failures() == ["max relative output error inf: the outputs hold NaN or inf"]


class Outputs(nn.Module):
    """A conv trunk returning its 4 logits and one value as a dict (two heads) or a tuple."""

    def __init__(self, structure: str = "dict"):
        super().__init__()
        self.structure = structure
        self.trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.digit, self.size = nn.Linear(256, 4), nn.Linear(256, 1)

    def forward(self, x):
        features = self.trunk(x)
        digit, size = self.digit(features), self.size(features)
        return {"digit": digit, "size": size} if self.structure == "dict" else (size, digit)


trainfer.register_model(Outputs, name="test_quantize:Outputs")


@pytest.mark.parametrize(
    "structure, kind",
    [("dict", {"heads": {"digit": "classification", "size": "regression"}}), ("tuple", {"output": 1})],
)
def test_cli_quantize_refuses_a_model_of_several_outputs_in_one_line(tmp_path, structure, kind):
    torch.manual_seed(0)
    bundle = trainfer.save(
        Outputs(structure).eval(),
        tmp_path / "b",
        factory="test_quantize:Outputs",
        config={"structure": structure},
        preprocess={"input_shape": [1, 8, 8]},
        **kind,
    )
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
    command = ["quantize", str(bundle), "--calibration", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "q")]
    result = CliRunner().invoke(main, [*command, "--trust-factory"])
    assert result.exit_code == 2 and result.output == (
        f"error: trainfer.quantize supports models that return one tensor; this one returns a {structure}: "
        "serve it in float32 (trainfer deploy)\n"
    )
    assert not (tmp_path / "q").exists()
