"""``trainfer compile``: the (gated) runtime search from the command line, recorded in the bundle, then served."""

import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from serving_models import gated_digits_bundle
from test_runtime_gated import INT8, _only_fast

import trainfer
from trainfer.cli import main
from trainfer.serve import runtime as rt

pytest.importorskip("onnxruntime")
RUNTIMES = sorted({"torch", "onnxruntime", INT8})  # INT8: the runtime that serves int8 here
FAST = (*(arg for name in RUNTIMES for arg in ("--candidates", name)), "--rounds", "2")
OPEN = ("--min-agreement", "0", "--max-accuracy-drop", "1")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A deployed digits bundle, 48 validation inputs (.npy) and the float model's own labels for them."""
    root = tmp_path_factory.mktemp("compile")
    deployed, x = gated_digits_bundle(root)
    return {"root": root, "deployed": deployed, "x": x}


@pytest.fixture
def bundle(made, tmp_path):
    return shutil.copytree(made["root"] / "bundle", tmp_path / "bundle")


def invoke(*args):
    return CliRunner().invoke(main, ["compile", *(str(a) for a in args)])


def files(bundle):
    return {path.name: path.read_bytes() for path in sorted(bundle.iterdir())}


def served_agreement(bundle, made):
    """Class agreement of what ``Predictor.load(bundle, runtime="recorded")`` serves with the float model."""
    predictor = trainfer.Predictor.load(bundle, runtime="recorded")
    recorded, serving = rt.read_record(bundle), predictor.model.record
    assert (serving.runtime, serving.dtype) == (recorded.runtime, recorded.dtype)
    with torch.no_grad():
        expected = made["deployed"](made["x"])
        return predictor.model, float((predictor.model(made["x"]).argmax(1) == expected.argmax(1)).double().mean())


def test_an_open_gate_lets_the_fastest_int8_form_be_chosen_recorded_and_served(made, bundle, monkeypatch):
    _only_fast(monkeypatch, f"{INT8}/int8")  # every other candidate sleeps while measured: int8 must win
    before = files(bundle)
    root = made["root"]
    result = invoke(bundle, "--gate-data", root / "x.npy", "--labels", root / "y.npy", *OPEN, *FAST)
    assert result.exit_code == 0, result.output
    record = rt.read_record(bundle)
    assert (record.runtime, record.dtype) == (INT8, "int8")
    assert f"{INT8}/int8 *" in result.output and "passed" in result.output and "torch/bfloat16" in result.output
    assert f"recorded {INT8}/int8" in result.output
    after = files(bundle)
    assert {name: after[name] for name in before} == before  # only runtime.json and the int8 form were added
    assert {"runtime.json", "quantized.onnx"} <= set(after) - set(before)
    model, agreement = served_agreement(bundle, made)
    chosen = next(c for c in record.candidates if c.name == f"{INT8}/int8")
    assert model.record.dtype == "int8" and agreement >= chosen.gate["agreement"] - 1e-9


def test_a_refusing_gate_leaves_float32_chosen_and_says_so(made, bundle):
    root = made["root"]
    result = invoke(bundle, "--gate-data", root / "x.npy", "--labels", root / "y.npy", "--max-rel-error", "1e-9", *FAST)
    assert result.exit_code == 0, result.output
    record = rt.read_record(bundle)
    by_name = {c.name: c for c in record.candidates}
    assert record.dtype == "float32" and "no bf16 or int8 form passed the gate: float32 stays chosen" in result.output
    assert all(by_name[name].status == "rejected" for name in ("torch/bfloat16", "onnxruntime/int8"))
    assert "FAILED" in result.output and not (bundle / "quantized.onnx").exists()
    model, agreement = served_agreement(bundle, made)
    with torch.no_grad():
        expected = made["deployed"](made["x"])
    scale = expected.abs().max()
    assert agreement == 1 and float((model(made["x"]) - expected).abs().max() / scale) <= 1e-5


def test_without_gate_data_only_float32_is_searched_and_it_says_why(made, bundle):
    result = invoke(bundle, "--candidates", "torch", "--rounds", "1")
    assert result.exit_code == 0, result.output
    assert "bf16 and int8 were not considered: no gate data was given" in result.output
    record = rt.read_record(bundle)
    assert {c.dtype for c in record.candidates} == {"float32"} and record.runtime == "torch"


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--gate-data", "{root}/x.npy", "--labels", "{root}/y5.npy"), "--gate-data has 48 inputs but --labels has 5"),
        (("--labels", "{root}/y.npy"), "need --gate-data"),
        (("--gate-data", "{root}/x.npy", "--runtime", "torch"), "use --runtime auto"),
        (("--gate-data", "{root}/x.npy", "--labels", "{root}/x.npy"), "expected integer class indices"),
    ],
    ids=["label-count", "labels-without-data", "gate-needs-auto", "float-labels"],
)
def test_bad_input_is_one_line_exit_2_and_leaves_the_bundle_unchanged(made, bundle, args, fragment):
    before = files(bundle)
    _one_line_error(invoke(bundle, *(a.format(root=made["root"]) for a in args), *FAST), fragment)
    assert files(bundle) == before


def test_a_missing_file_or_a_non_bundle_exits_2(made, bundle, tmp_path):
    before = files(bundle)
    missing = invoke(bundle, "--gate-data", tmp_path / "nowhere.npy")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    _one_line_error(invoke(tmp_path, *FAST), "no trainfer bundle at")
    assert files(bundle) == before


@pytest.mark.parametrize(
    "args",
    [
        ["compile", "{bundle}", "--runtime", "inductor"],
        ["compile", "{bundle}", "--candidates", "torch", "--candidates", "inductor"],
        ["serve", "{bundle}", "--compile", "--candidates", "inductor", "--write-runtime"],
    ],
)
def test_a_search_that_would_record_a_code_generating_runtime_is_refused_before_measuring(bundle, monkeypatch, args):
    """runtime.json never records inductor (it compiles code when built: it runs only when named at load),
    so compile, and serve --compile --write-runtime, refuse to search for it before anything runs."""
    from trainfer.serve import gated

    monkeypatch.setattr(gated, "compile", lambda *a, **k: pytest.fail("measured a search it cannot record"))
    monkeypatch.setattr("trainfer.server.run.serve", lambda *a, **k: pytest.fail("served"))
    before = files(bundle)
    refused = CliRunner().invoke(main, [part.format(bundle=bundle) for part in args])
    assert refused.exit_code == 2, refused.output
    assert (
        refused.output.count("\n") == 1
        and "runtime.json records only runtimes that load without generating code" in refused.output
    )
    assert files(bundle) == before


def test_gate_data_without_calibration_warns_that_int8_is_gated_on_its_own_calibration(made, bundle, monkeypatch):
    from trainfer.serve import gated

    monkeypatch.setattr(gated, "compile_float", _stop)  # the warning comes before the search
    root = made["root"]
    with pytest.warns(UserWarning, match="compile: the int8 candidates are calibrated on the gate data") as caught:
        result = invoke(bundle, "--gate-data", root / "x.npy", "--labels", root / "y.npy", *FAST)
    assert result.exit_code == 2 and "search stopped here" in result.output
    assert len([w for w in caught if "overstates agreement on new data" in str(w.message)]) == 1


def _stop(*args, **options):
    raise trainfer.InputError("search stopped here")


def _labels(tmp_path, values):
    path = tmp_path / "labels.npy"
    np.save(path, np.asarray(values, dtype=np.int64))
    return path


@pytest.mark.parametrize("value", [2**40, -1])
def test_labels_no_class_can_be_are_refused_before_the_search_as_prune_refuses_them(
    made, bundle, tmp_path, monkeypatch, value
):
    """Attacker round 7: compile --labels 2**40 failed the int8 candidate alone, recorded float32 and exited 0."""
    labels, gate_data = _labels(tmp_path, [value] * 48), made["root"] / "x.npy"
    monkeypatch.setattr(rt, "_candidate", lambda *a, **k: pytest.fail("a candidate was built"))
    before = files(bundle)
    refused = invoke(bundle, "--gate-data", gate_data, "--labels", labels, *FAST)
    message = f"labels must be class indices in 0..9 (10 classes); got {value} (48 out of range)"
    _one_line_error(refused, message)
    assert files(bundle) == before
    pruned = CliRunner().invoke(main, ["prune", str(bundle), "-o", str(tmp_path / "p"), "--data", str(gate_data)])
    assert pruned.exit_code == 0  # the same data without labels prunes
    refused_by_prune = ["prune", bundle, "-o", tmp_path / "q", "--data", gate_data, "--labels", labels]
    _one_line_error(CliRunner().invoke(main, [str(a) for a in refused_by_prune]), message)


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((48,), "search stopped here"),
        ((48, 1), "search stopped here"),
        ((48, 2), "shape (48,) or (48, 1); got shape (48, 2)"),  # not flattened into 96 labels
        ((1, 48), "--gate-data has 48 inputs but --labels has 1"),
    ],
)
def test_labels_are_one_per_input_or_one_column_of_them_nothing_else(
    made, bundle, tmp_path, monkeypatch, shape, fragment
):
    """(N, 1) labels, as ``y.reshape(-1, 1)`` saves them, are read as (N,); other shapes are refused."""
    y = np.load(made["root"] / "y.npy")
    labels = _labels(tmp_path, np.stack([y, y], 1).reshape(shape) if shape == (48, 2) else y.reshape(shape))
    monkeypatch.setattr(rt, "_candidate", _stop)  # past the labels' check, the search starts here
    _one_line_error(invoke(bundle, "--gate-data", made["root"] / "x.npy", "--labels", labels, *FAST), fragment)


@pytest.mark.parametrize("samples", [1, 29, 30])
def test_a_gate_on_fewer_than_30_samples_warns_that_its_verdict_means_little(
    made, bundle, tmp_path, monkeypatch, samples
):
    """Attacker round 7: int8 passed a gate of one sample, recorded ``"samples": 1`` and said nothing."""
    x = np.load(made["root"] / "x.npy")[:samples]
    np.save(tmp_path / "x.npy", x)
    labels = _labels(tmp_path, np.load(made["root"] / "y.npy")[:samples])
    monkeypatch.setattr(rt, "_candidate", _stop)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(bundle, "--gate-data", tmp_path / "x.npy", "--labels", labels, *FAST)
    _one_line_error(result, "search stopped here")
    said = [str(w.message) for w in caught if "fewer than 30" in str(w.message)]
    assert len(said) == (samples < 30), said
    assert all(text.startswith(f"the accuracy gate measures on {samples} sample(s)") for text in said)


def test_threads_are_what_every_runtime_is_measured_and_recorded_with(made, bundle):
    result = invoke(bundle, "--candidates", "torch", "--rounds", "1", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert rt.read_record(bundle).threads["measured_with"] == 1
    _one_line_error(invoke(bundle, "--threads", "0"), "--threads")


@pytest.mark.parametrize("labels", [False, True])
def test_a_max_accuracy_drop_without_labels_is_said_to_go_unchecked(made, bundle, labels):
    """Attacker round 6 L-1: --max-accuracy-drop without --labels was recorded as a gate it never measured."""
    args = [bundle, "--gate-data", made["root"] / "x.npy", "--max-accuracy-drop", "0.01", "--candidates", "torch"]
    args += ["--labels", made["root"] / "y.npy"] if labels else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(*args, "--rounds", "1")
    assert result.exit_code == 0, result.output
    said = any("--max-accuracy-drop is not checked without --labels" in str(w.message) for w in caught)
    assert said != labels
