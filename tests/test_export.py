"""Export: deploy form, dynamic batch, parity with PyTorch (onnxruntime), the manifest inside the file."""

import collections
import importlib
import sys

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer import BundleError, EquivalenceError, Predictor
from trainfer.reparam.deploy import deploy
from trainfer.serve.export import export
from trainfer.serve.onnx_runtime import read_exported_manifest
from trainfer.testing import assert_close, randomize_batchnorm


@trainfer.register_model
def tiny_cnn(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 16, classes),
    )


@trainfer.register_model
class TwoHeads(nn.Module):
    """Returns a dict: class probabilities (softmax inside the model) and a regression value."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
        self.digit = nn.Linear(3 * 64, 4)
        self.size = nn.Linear(3 * 64, 1)

    def forward(self, x):
        h = self.body(x)
        return {"digit": torch.softmax(self.digit(h), dim=1), "size": self.size(h)}


def trained(factory=tiny_cnn):
    torch.manual_seed(0)
    return randomize_batchnorm(factory()).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "bundle"
    spec = trainfer.PreprocessSpec(mean=[0.2], std=[0.7])
    model = trained()
    trainfer.save(
        model,
        path,
        factory=f"{__name__}:tiny_cnn",
        labels=list("abc"),
        preprocess=spec,
        example_inputs=torch.randn(1, 1, 8, 8),
    )
    return path, model


@pytest.fixture(scope="module")
def onnx_file(bundle):
    path = bundle[0].parent / "model.onnx"
    return path, export(bundle[0], path, format="onnx")


def test_onnx_export_matches_pytorch_through_onnxruntime(bundle, onnx_file):
    path, report = onnx_file
    assert path.is_file() and report.format == "onnx" and report.deployed_here and report.form == "deploy"
    assert report.max_rel_error <= 1e-5 and report.checked_batch_sizes == (1, 3)
    assert "max rel error" in str(report)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, model = bundle
    for batch in (1, 5):  # dynamic batch dimension
        x = torch.randn(batch, 1, 8, 8)
        (got,) = session.run(None, {"input": x.numpy()})
        with trainfer.inference(model):
            assert_close(torch.from_numpy(got), model(x))


def test_the_onnx_file_is_the_deploy_form(onnx_file):
    import onnx

    ops = {node.op_type for node in onnx.load(str(onnx_file[0])).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_manifest_travels_inside_and_predictor_serves_the_onnx_file(bundle, onnx_file):
    manifest = read_exported_manifest(onnx_file[0])
    assert manifest.form == "deploy" and manifest.labels == ["a", "b", "c"]
    assert manifest.to_json()["exported"] == {"format": "onnx", "deployed_here": True} and manifest.weights is None
    served = Predictor.load(onnx_file[0])
    reference = Predictor.load(bundle[0])
    raw = torch.rand(6, 1, 8, 8)
    got, expected = served.predict(raw, top_k=2), reference.predict(raw, top_k=2)
    assert_results_close(got, expected)  # ONNX Runtime vs torch: equal within rounding
    assert served.spec == reference.spec


@pytest.mark.parametrize(("format", "suffix"), [("torchscript", ".ts"), ("exported-program", ".pt2")])
def test_torchscript_and_exported_program(tmp_path, format, suffix):
    model = trained()
    deployed = deploy(model, torch.randn(2, 1, 8, 8))
    report = export(deployed, tmp_path / f"m{suffix}", format=format, example_inputs=torch.randn(2, 1, 8, 8))
    assert not report.deployed_here and report.max_rel_error <= 1e-5
    assert read_exported_manifest(tmp_path / f"m{suffix}").exported.format == format
    loaded = (
        torch.jit.load(str(tmp_path / "m.ts"))
        if format == "torchscript"
        else torch.export.load(str(tmp_path / "m.pt2")).module()
    )
    x = torch.randn(4, 1, 8, 8)
    with trainfer.inference(model):
        assert_close(loaded(x), model(x))


def test_dict_outputs_through_onnx_and_multi_head_predictor(tmp_path):
    model = trained(TwoHeads)
    heads = {"digit": "classification", "size": "regression"}
    trainfer.save(
        model, tmp_path / "b", factory=f"{__name__}:TwoHeads", heads=heads, example_inputs=torch.randn(1, 1, 8, 8)
    )
    manifest = trainfer.serve.bundle.read_manifest(tmp_path / "b")
    assert manifest.to_json()["output_structure"] == {"type": "dict", "keys": ["digit", "size"]}
    assert manifest.heads[0].output_kind == "probabilities"
    report = export(tmp_path / "b", tmp_path / "m.onnx")
    assert report.outputs == ("digit", "size")
    x = torch.randn(3, 1, 8, 8)
    served = Predictor.load(tmp_path / "m.onnx").predict(x)
    with trainfer.inference(model):
        out = model(x)
    for i, result in enumerate(served):
        assert result["digit"].probability == pytest.approx(float(out["digit"][i].max()), abs=1e-6)
        assert result["size"].values == pytest.approx(out["size"][i].tolist(), abs=1e-5)


def test_a_disagreeing_export_is_never_written(tmp_path, monkeypatch):
    module = importlib.import_module("trainfer.serve.export")

    def noisy(path):
        loaded = torch.jit.load(str(path))
        return lambda x: loaded(x) + 1.0

    monkeypatch.setitem(module._RUNNERS, "torchscript", noisy)
    deployed = deploy(trained(), torch.randn(2, 1, 8, 8))
    with pytest.raises(EquivalenceError, match="max rel error .* nothing was written"):
        export(deployed, tmp_path / "m.ts", format="torchscript", example_inputs=torch.randn(2, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_rtol_bounds_the_relative_error(tmp_path, monkeypatch):
    """An exported file 1e-3 (relative) off passes under rtol=1e-2 and is refused under the default."""
    module = importlib.import_module("trainfer.serve.export")

    def scaled(path):
        loaded = torch.jit.load(str(path))
        return lambda x: loaded(x) * (1 + 1e-3)

    monkeypatch.setitem(module._RUNNERS, "torchscript", scaled)
    deployed, x = deploy(trained(), torch.randn(2, 1, 8, 8)), torch.randn(2, 1, 8, 8)
    report = export(deployed, tmp_path / "loose.ts", format="torchscript", example_inputs=x, rtol=1e-2)
    assert 5e-4 < report.max_rel_error < 2e-3 and (tmp_path / "loose.ts").is_file()
    with pytest.raises(EquivalenceError, match=r"> 1e-05"):
        export(deployed, tmp_path / "strict.ts", format="torchscript", example_inputs=x)
    assert not (tmp_path / "strict.ts").exists()


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="format must be one of"):
        export(trained(), tmp_path / "m.x", format="tflite", example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="needs the input shape"):
        export(trained(), tmp_path / "m.onnx")
    import onnx

    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(tmp_path / "plain.onnx"))
    with pytest.raises(BundleError, match="carries no trainfer manifest"):
        Predictor.load(tmp_path / "plain.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"trainfer\[onnx\]"):
        Predictor.load(tmp_path / "plain.onnx")


Pair = collections.namedtuple("Pair", "act pre")


@trainfer.register_model
class NamedBinary(nn.Module):
    """A binary table model returning a named tuple (activation, pre-activation)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        z = self.linear(x)
        return Pair(torch.sigmoid(z).squeeze(1), z)


def test_named_tuple_outputs_keep_their_fields_through_onnx(tmp_path):
    torch.manual_seed(3)
    model = NamedBinary().eval()
    trainfer.save(
        model,
        tmp_path / "b",
        factory=f"{__name__}:NamedBinary",
        task="binary",
        output="pre",
        example_inputs=torch.randn(2, 4),
    )
    export(tmp_path / "b", tmp_path / "m.onnx")
    served = Predictor.load(tmp_path / "m.onnx")
    assert served.heads[0].select == "pre" and served.heads[0].kind.kind == "logits"
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x).act
    np.testing.assert_allclose([r.probability for r in served.predict(x)], expected, atol=1e-6)
    chosen = Predictor.load(tmp_path / "m.onnx", output="act", output_kind="probabilities")
    np.testing.assert_allclose([r.probability for r in chosen.predict(x)], expected, atol=1e-6)


def test_float64_onnx_is_refused_clearly_and_nothing_is_written(tmp_path):
    model = trained().double()
    with pytest.raises(ValueError, match=r"onnxruntime cannot run .*export a float32 copy, model.float\(\)"):
        export(model, tmp_path / "m.onnx", example_inputs=torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert list(tmp_path.iterdir()) == []
    report = export(model.float(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 1, 8, 8))
    assert report.max_rel_error <= 1e-5


@settings(max_examples=4)
@given(
    channels=st.integers(1, 4),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    depthwise=st.booleans(),
    seed=st.integers(0, 100),
)
def test_onnx_parity_over_random_configurations(channels, kernel, stride, dilation, depthwise, seed):
    import tempfile

    import onnxruntime

    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(
            channels,
            channels * 2,
            kernel,
            stride=stride,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            groups=channels if depthwise else 1,
        ),
        nn.BatchNorm2d(channels * 2),
    ]
    model = randomize_batchnorm(nn.Sequential(*layers), seed=seed).eval()
    with tempfile.TemporaryDirectory() as root:
        report = export(model, f"{root}/m.onnx", example_inputs=torch.randn(2, 1, 7, 7))
        assert report.max_rel_error <= 1e-5
        session = onnxruntime.InferenceSession(f"{root}/m.onnx", providers=["CPUExecutionProvider"])
        x = torch.randn(4, 1, 7, 7)
        (got,) = session.run(None, {"input": x.numpy()})
    with trainfer.inference(model):
        assert_close(torch.from_numpy(got), model(x))


@pytest.mark.parametrize(("rtol", "error"), [(float("nan"), ValueError), (float("inf"), ValueError),
                                             (-1e-3, ValueError), ("1e-3", TypeError)])  # fmt: skip
def test_a_tolerance_that_checks_nothing_is_refused_before_any_work(tmp_path, rtol, error):
    with pytest.raises(error, match="rtol must be a finite number > 0 or None") as raised:
        export(torch.nn.Conv2d(1, 1, 1), tmp_path / "m.ts", format="torchscript", rtol=rtol)
    assert isinstance(raised.value, trainfer.TrainferError) and not (tmp_path / "m.ts").exists()


class Gate(nn.Module):
    """A custom module with Python control flow on its input: deploy keeps it as one opaque op."""

    def forward(self, x):
        return x.relu() if bool(x.abs().sum() >= 0) else x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gate = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), Gate()
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        return self.fc(self.gate(self.bn(self.conv(x))).flatten(1))


def test_a_deploy_form_holding_a_custom_module_is_exported_though_not_saved(tmp_path):
    model = trained(WithGate)
    x = torch.randn(2, 1, 8, 8)
    deployed = deploy(model, x)
    with pytest.raises(BundleError, match=r"module 'gate'.*save its training form with factory=.*trainfer\.export"):
        trainfer.save(deployed, tmp_path / "bundle", example_inputs=x)
    report = export(deployed, tmp_path / "m.onnx", example_inputs=x)
    assert not report.deployed_here
    assert_results_close(Predictor.load(tmp_path / "m.onnx").predict(x), Predictor(model).predict(x))
