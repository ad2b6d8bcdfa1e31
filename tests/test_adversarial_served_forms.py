"""The attacker's served forms and manifest contradictions: every answer must come from the float form.

A bundle's digests prove nothing (the attacker recomputes them), so each attack here rewrites a
file *and* its recorded sha256, as an attacker would, and the load must refuse with a
:class:`trainfer.BundleError`, run no code (a marker file must never appear) and serve nothing
wrong. Attacks (issue 22, section 4):

* ``quantized.onnx`` replaced by another valid model (another model's int8 form; one answering
  class 3 for every input, also through ``trainfer predict``; one whose weights name an external
  file as a marker), sha256 recomputed, under onnxruntime and openvino, with the recorded gate
  loosened to 0 as well;
* the probe inputs stored beside it removed, forged (sha256, shape, NaN, none) or never recorded;
* ``runtime.json`` naming a runtime whose engine answers wrong (it is rebuilt and verified);
* ``output_kind`` probabilities / log-probabilities declared on a logits head, and logits declared
  on a softmax head, in a bundle and inside an exported ONNX file;
* ``preprocess.input_shape`` against ``input.shape``, ``preprocess.dtype`` against ``input.dtype``,
  ``task``/``labels`` against ``heads``, an output kind on a regression head.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from serving_models import FACTORY, save_bundle, trained
from time_limit import time_limit

import trainfer
from trainfer import BundleError, Predictor
from trainfer.cli import main
from trainfer.serve import int8_form
from trainfer.serve import runtime as rt
from trainfer.serve.served_checks import MAX_PROBES, MIN_INT8_AGREEMENT, PROBES_FILE

SPEC = {"input_shape": [1, 8, 8]}
needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
OPENVINO = pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _int8(model: torch.nn.Module, path: Path) -> Path:
    calibration = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gate = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)  # passes any candidate, deliberately
    result = trainfer.quantize(model, calibration, gate=gate, equalize=False, sensitivity_samples=16)
    return result.save(path, factory=FACTORY, preprocess=SPEC)


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory):
    """Two int8 bundles of different models: the second's ``quantized.onnx`` is the attacker's file."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("served")
    return _int8(trained(5, outputs=10), root / "genuine"), _int8(trained(6, outputs=10), root / "other")


def _swap_int8(genuine: Path, replacement: bytes, target: Path, loosen_gate: bool = False) -> Path:
    """A copy of ``genuine`` whose ``quantized.onnx`` is ``replacement``, its sha256 recomputed."""
    import shutil

    shutil.copytree(genuine, target)
    (target / int8_form.QUANTIZED_FILE).write_bytes(replacement)

    def forge(entry):
        entry["sha256"] = hashlib.sha256(replacement).hexdigest()
        if loosen_gate:
            entry["report"]["gate"]["gate"] = {"min_agreement": 0.0, "max_accuracy_drop": None, "max_rel_error": None}

    _rewrite_json(target / int8_form.QUANTIZATION_FILE, forge)
    return target


# --------------------------------------------------------------------------- int8 forms
@needs_ort
def test_a_genuine_int8_form_loads_and_agrees_with_its_float_form_on_its_probes(int8_bundles):
    genuine, _ = int8_bundles
    served = Predictor.load(genuine)
    probes = load_file(str(genuine / PROBES_FILE))["inputs"]
    assert probes.shape == (MAX_PROBES, 1, 8, 8)
    with torch.no_grad():
        expected = trainfer.load(genuine)(probes).argmax(1)
    agreement = float((served.model(probes).argmax(1) == expected).double().mean())
    assert agreement >= MIN_INT8_AGREEMENT


@needs_ort
@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda entry, path: entry.pop("probes"), id="no probes recorded (an older trainfer)"),
        pytest.param(lambda entry, path: (path / PROBES_FILE).unlink(), id="probes file removed"),
        pytest.param(lambda entry, path: entry["probes"].update(sha256="0" * 64), id="probes sha256 wrong"),
        pytest.param(lambda entry, path: _write_probes(path, entry, torch.zeros(2, 3, 8, 8)), id="probes mis-shaped"),
        pytest.param(lambda entry, path: _write_probes(path, entry, torch.full((2, 1, 8, 8), float("nan"))), id="nan"),
        pytest.param(lambda entry, path: _write_probes(path, entry, torch.zeros(0, 1, 8, 8)), id="no probes"),
    ],
)
def test_int8_probes_that_cannot_check_anything_are_refused(int8_bundles, tmp_path, forge):
    import shutil

    genuine, _ = int8_bundles
    path = tmp_path / "forged"
    shutil.copytree(genuine, path)
    _rewrite_json(path / int8_form.QUANTIZATION_FILE, lambda entry: forge(entry, path))
    with pytest.raises(BundleError, match="probe"):
        Predictor.load(path)


def _set(path: tuple[str, ...], value):
    """A forge setting ``entry[path...] = value``."""

    def forge(entry):
        for key in path[:-1]:
            entry = entry[key]
        entry[path[-1]] = value

    return forge


def _sqnr(field: str, value: float):
    """A forge setting ``field`` of the sensitivity ranking's first layer to ``value``."""

    def forge(entry):
        entry["report"]["sensitivity"][0][field] = value

    return forge


@needs_ort
def test_an_int8_record_takes_the_infinite_sqnr_of_a_layer_quantized_without_noise(int8_bundles):
    """trainfer writes ``sqnr_db: Infinity`` for a layer whose quantization adds no noise: still a record."""
    from trainfer.serve.quantization_schema import check_int8_record

    genuine, _ = int8_bundles
    entry = json.loads((genuine / int8_form.QUANTIZATION_FILE).read_text())
    entry["report"]["sensitivity"][0].update(sqnr_db=float("inf"), weight_sqnr_db=float("inf"))
    check_int8_record(json.loads(json.dumps(entry)), "quantization.json")


@needs_ort
@pytest.mark.parametrize(
    ("forge", "message"),
    [
        pytest.param(
            _set(("format_version",), 99), "format_version 99; this trainfer reads int8 records up to 2", id="newer"
        ),
        pytest.param(_set(("format_version",), "2"), "format_version: Input should be a valid integer", id="text"),
        pytest.param(
            _set(("format_version",), -1), "format_version: Input should be greater than or equal to 1", id="neg"
        ),
        pytest.param(_set(("format_version",), 10**30), "format_version", id="huge"),
        pytest.param(_set(("zzz",), 1), "zzz: Extra inputs are not permitted", id="unknown key"),
        pytest.param(_set(("report",), "junk"), "report: Input should be", id="report junk"),
        pytest.param(_set(("report", "gate", "ok"), False), "gate verdict failed", id="failed gate"),
        pytest.param(_set(("report", "gate", "samples"), 0), "contradicts itself", id="gate of 0 samples marked ok"),
        pytest.param(_set(("made_by",), "x" * 100_000), "made_by: String should have at most 200", id="long made_by"),
        pytest.param(_set(("made_by",), "someone"), "made_by must be one of", id="other made_by"),
        pytest.param(_set(("sha256",), "ABC"), "sha256: String should match pattern", id="sha256 not hex"),
        pytest.param(_set(("report", "sensitivity"), [{"name": "x"}] * 5000), "sensitivity", id="5000 layers"),
        pytest.param(
            _set(("report", "gate", "max_rel_error"), float("inf")),
            "max relative output error inf: the outputs hold NaN or inf",
            id="passing gate of infinite error",
        ),
        pytest.param(_sqnr("sqnr_db", float("-inf")), "sqnr_db", id="sqnr -inf"),
        pytest.param(_sqnr("weight_sqnr_db", float("nan")), "weight_sqnr_db", id="weight sqnr nan"),
    ],
)
def test_an_int8_record_off_its_schema_is_refused_naming_the_field(int8_bundles, tmp_path, forge, message):
    """``quantization.json`` is checked as strictly as ``runtime.json`` (attacker round 10, F10): each
    of these was served as onnxruntime/int8 before, without a word."""
    import shutil

    genuine, _ = int8_bundles
    path = tmp_path / "forged"
    shutil.copytree(genuine, path)
    _rewrite_json(path / int8_form.QUANTIZATION_FILE, forge)
    with pytest.raises(BundleError, match="int8 record") as refused:
        Predictor.load(path)
    assert message in str(refused.value) and len(str(refused.value)) < 1200


def _write_probes(path: Path, entry: dict, inputs: torch.Tensor) -> None:
    save_file({"inputs": inputs}, str(path / PROBES_FILE))
    entry["probes"]["sha256"] = _sha256(path / PROBES_FILE)


@needs_ort
@pytest.mark.parametrize(
    "runtime",
    [None, pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed"))],
)
@pytest.mark.parametrize("loosen_gate", [False, True])
def test_an_int8_file_of_another_model_with_its_sha256_is_refused(int8_bundles, tmp_path, runtime, loosen_gate):
    genuine, other = int8_bundles
    forged = _swap_int8(genuine, (other / int8_form.QUANTIZED_FILE).read_bytes(), tmp_path / "forged", loosen_gate)
    options = {"runtime": runtime} if runtime else {}
    with pytest.raises(BundleError, match="does not agree with the bundle's float weights"):
        Predictor.load(forged, **options)
    float_form = Predictor.load(forged, runtime="torch")  # the float form itself is still served on request
    assert float_form.model.record.runtime == "torch"


def _constant_class_model(classes: int, label: int) -> bytes:
    """A valid ONNX model that answers ``label`` for every input (the issue's "class 3 for every input")."""
    import onnx
    from onnx import TensorProto, helper

    logits = [0.0] * classes
    logits[label] = 10.0
    graph = helper.make_graph(
        [  # only operators trainfer's int8 forms use, so that the agreement check (not the op allow-list) refuses it
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "zeros", "logits"], ["output"]),
        ],
        "constant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])],
        [
            helper.make_tensor("zeros", TensorProto.FLOAT, [64, classes], [0.0] * (64 * classes)),
            helper.make_tensor("logits", TensorProto.FLOAT, [classes], logits),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@needs_ort
def test_an_int8_file_answering_one_class_for_every_input_is_refused(int8_bundles, tmp_path):
    genuine, _ = int8_bundles
    forged = _swap_int8(genuine, _constant_class_model(10, 3), tmp_path / "forged", loosen_gate=True)
    with pytest.raises(BundleError, match="does not agree"):
        Predictor.load(forged)
    probes = tmp_path / "x.npy"
    np.save(probes, np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    result = CliRunner().invoke(main, ["predict", str(forged), str(probes)])
    assert result.exit_code == 2 and "does not agree" in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_ort
def test_an_int8_file_that_names_a_marker_file_runs_nothing(int8_bundles, tmp_path, monkeypatch):
    """ONNX external data naming a path outside the bundle: never read, never written, refused."""
    import onnx

    genuine, _ = int8_bundles
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    proto = onnx.load_from_string(_constant_class_model(10, 3))
    weights = next(t for t in proto.graph.initializer if t.name == "logits")
    weights.data_location = onnx.TensorProto.EXTERNAL
    weights.ClearField("float_data")
    entry = weights.external_data.add()
    entry.key, entry.value = "location", os.fspath(marker)
    forged = _swap_int8(genuine, proto.SerializeToString(), tmp_path / "forged", loosen_gate=True)
    with pytest.raises(BundleError):
        Predictor.load(forged)
    assert not marker.exists()


@needs_ort
def test_a_recorded_runtime_that_answers_wrong_is_refused(tmp_path, monkeypatch):
    """runtime.json may only name a runtime: what serves is rebuilt from the float weights and verified."""
    path = save_bundle(tmp_path / "b", 3)
    compiled = trainfer.compile(path, torch.randn(2, 1, 8, 8), runtime="onnxruntime")
    record = compiled.record
    record.candidates[0].tolerance = 1e9  # a forged tolerance is never read
    rt.save_record(path, record)

    def wrong(path, manifest, threads):
        return lambda batch: torch.zeros(len(batch), 3)

    monkeypatch.setattr(rt, "ort_engine", wrong)
    with pytest.raises(trainfer.EquivalenceError, match="cannot serve this model"):
        Predictor.load(path, runtime="recorded")


# --------------------------------------------------------------------------- bundle files that are not regular files
NOT_REGULAR = {
    "fifo": "a pipe",
    "directory": "a directory",
    "link to /dev/zero": "a character device",
    "dangling link": "a dangling link",
}


def _not_regular(path: Path, kind: str) -> None:
    """Put a ``kind`` of :data:`NOT_REGULAR` where the bundle file ``path`` was (an unpacked archive can)."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "link to /dev/zero" else path.parent / "moved-away.json")


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_a_runtime_json_that_is_not_a_regular_file_is_refused_naming_it(tmp_path, kind):
    """Not skipped as "no record" (predict and serve then silently served another form): refused, never waited on."""
    path = save_bundle(tmp_path / "b", 3)
    _not_regular(path / "runtime.json", kind)
    with time_limit(30), pytest.raises(BundleError, match=f"runtime.json' is {NOT_REGULAR[kind]}: expected a regular"):
        Predictor.load(path)


@pytest.mark.parametrize("name", ["manifest.json", "model.safetensors"])
@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_a_manifest_or_weights_file_that_is_not_a_regular_file_is_named_as_what_it_is(tmp_path, kind, name):
    """Attacker round 6 L-4: these were refused at once, but as missing ("no trainfer bundle", "lacks its
    weights file"): now in the words of every other bundle file."""
    path = save_bundle(tmp_path / "b", 3)
    _not_regular(path / name, kind)
    with time_limit(30), pytest.raises(BundleError, match=f"{name}' is {NOT_REGULAR[kind]}: expected a regular"):
        Predictor.load(path)


def test_the_command_line_refuses_a_fifo_runtime_json_in_one_line(tmp_path):
    path = save_bundle(tmp_path / "b", 3)
    _not_regular(path / "runtime.json", "fifo")
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    with time_limit(60):
        result = CliRunner().invoke(main, ["predict", str(path), str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert "runtime.json' is a pipe: expected a regular file" in result.output


@needs_ort
@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_an_int8_record_that_is_not_a_regular_file_is_refused_not_skipped(int8_bundles, tmp_path, kind):
    """A quantize bundle whose quantization.json is a FIFO silently served its float form."""
    import shutil

    path = tmp_path / "b"
    shutil.copytree(int8_bundles[0], path)
    _not_regular(path / int8_form.QUANTIZATION_FILE, kind)
    with time_limit(30), pytest.raises(BundleError, match=f"quantization.json' is {NOT_REGULAR[kind]}"):
        Predictor.load(path)


@needs_ort
@pytest.mark.parametrize("name", [int8_form.QUANTIZATION_FILE, int8_form.QUANTIZED_FILE, PROBES_FILE])
def test_serving_an_int8_form_never_waits_on_a_fifo(int8_bundles, tmp_path, name):
    """What a runtime.json choosing int8 reaches: opening a FIFO quantization.json blocked predict and serve forever."""
    import shutil

    path = tmp_path / "b"
    shutil.copytree(int8_bundles[0], path)
    _not_regular(path / name, "fifo")
    with time_limit(30), pytest.raises(BundleError, match=f"{name}' is a pipe: expected a regular file"):
        int8_form.serve_quantized(path)


# --------------------------------------------------------------------------- files swapped after their check
def _then_swapped(check, file: Path, replacement: bytes | None):
    """``check`` (a module's ``sha256`` or ``present``) that, once it has run, puts ``replacement`` at ``file``
    (``None``: a FIFO): another file swapped in between trainfer's check and its load, as whoever can
    write the bundle's directory can."""

    def check_then_swap(data):
        result = check(data)
        swap = file.with_name(file.name + ".swap")
        if replacement is None:
            os.mkfifo(swap)
        else:
            swap.write_bytes(replacement)
        os.replace(swap, file)
        return result

    return check_then_swap


@needs_ort
@pytest.mark.parametrize("runtime", ["onnxruntime", OPENVINO])
def test_an_int8_file_swapped_after_its_digest_check_is_never_run(int8_bundles, tmp_path, monkeypatch, runtime):
    """ONNX Runtime and OpenVINO opened quantized.onnx again by name after trainfer hashed its bytes: a model
    put in its place in between was the one run. The engine is built from the very bytes checked."""
    import shutil

    genuine, other = int8_bundles
    path, file = tmp_path / "b", tmp_path / "b" / int8_form.QUANTIZED_FILE
    shutil.copytree(genuine, path)
    attacker = (other / int8_form.QUANTIZED_FILE).read_bytes()
    monkeypatch.setattr(int8_form, "sha256", _then_swapped(int8_form.sha256, file, attacker))
    served = int8_form.serve_quantized(path, runtime)
    assert file.read_bytes() == attacker  # the swap happened after the check
    monkeypatch.undo()
    probes = load_file(str(genuine / PROBES_FILE))["inputs"]
    assert torch.equal(served(probes), int8_form.serve_quantized(genuine, runtime)(probes))


def test_weights_swapped_after_their_digest_check_are_never_loaded(tmp_path, monkeypatch):
    """model.safetensors was hashed, then opened again by name to load: other weights (same shapes) put
    in its place in between were the ones loaded. The weights loaded are the very bytes hashed."""
    from trainfer.serve import weights

    path, file = save_bundle(tmp_path / "b", 3), tmp_path / "b" / "model.safetensors"
    expected = load_file(str(file))
    attacker = (save_bundle(tmp_path / "other", 4) / file.name).read_bytes()
    monkeypatch.setattr(weights, "sha256", _then_swapped(weights.sha256, file, attacker))
    state = trainfer.load(path).state_dict()
    assert file.read_bytes() == attacker  # the swap happened after the check
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())


def test_weights_load_from_their_bytes_where_no_descriptor_link_exists(tmp_path):
    """Where ``/proc/self/fd`` is missing (or the file has no descriptor), the weights are loaded from
    the open file's bytes, the same tensors."""
    import io

    from trainfer.serve import weights

    file = save_bundle(tmp_path / "b", 3) / "model.safetensors"
    handle = io.BytesIO(file.read_bytes())
    handle.read()  # hashed: the load starts again from the beginning
    state = weights._safetensors_state(handle, file)
    expected = load_file(str(file))
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


def test_weights_swapped_for_a_fifo_after_their_check_are_refused_at_once(tmp_path, monkeypatch):
    """A FIFO put where model.safetensors was, after the check that it is a regular file, blocked the
    hash's open() forever: the file is opened without blocking and refused as what it is."""
    from trainfer.serve import weights

    path, file = save_bundle(tmp_path / "b", 3), tmp_path / "b" / "model.safetensors"
    monkeypatch.setattr(weights, "present", _then_swapped(weights.present, file, None))
    with time_limit(30), pytest.raises(BundleError, match="model.safetensors' is a pipe: expected a regular file"):
        trainfer.load(path)


# --------------------------------------------------------------------------- declared output kinds
@pytest.mark.parametrize("declared", ["probabilities", "log_probabilities"])
def test_a_probability_kind_declared_on_a_logits_head_is_refused(tmp_path, declared):
    path = save_bundle(tmp_path / "b", 3)  # a plain linear head: logits
    _rewrite_json(path / "manifest.json", lambda m: m["heads"][0].update(output_kind=declared))
    with pytest.raises(BundleError, match=f"declared output kind '{declared}'"):
        Predictor.load(path)


def test_logits_declared_on_a_softmax_head_is_refused(tmp_path):
    path = save_bundle(tmp_path / "b", 3, final="softmax")
    assert json.loads((path / "manifest.json").read_text())["heads"][0]["output_kind"] == "probabilities"
    Predictor.load(path)  # as saved: detected and agreeing
    _rewrite_json(path / "manifest.json", lambda m: m["heads"][0].update(output_kind="logits"))
    with pytest.raises(BundleError, match="softmax would be applied twice"):
        Predictor.load(path)


def test_the_caller_may_still_declare_a_kind_and_is_warned(tmp_path):
    """Only the bundle's own declarations are checked at load; the caller's stay a warning at predict."""
    path = save_bundle(tmp_path / "b", 3)
    predictor = Predictor.load(path, output_kind="probabilities")
    with pytest.warns(trainfer.OutputKindWarning):
        predictor.predict(torch.randn(2, 1, 8, 8))


@needs_ort
def test_a_kind_contradiction_inside_an_exported_onnx_file_is_refused(tmp_path):
    import onnx

    from trainfer.serve.onnx_runtime import MANIFEST_KEY

    path = save_bundle(tmp_path / "b", 3)
    onnx_path = tmp_path / "m.onnx"
    trainfer.export(path, onnx_path)
    proto = onnx.load(str(onnx_path))
    entry = next(p for p in proto.metadata_props if p.key == MANIFEST_KEY)
    manifest = json.loads(entry.value)
    manifest["heads"][0]["output_kind"] = "probabilities"
    entry.value = json.dumps(manifest)
    onnx.save(proto, str(onnx_path))
    with pytest.raises(BundleError, match="declared output kind 'probabilities'"):
        Predictor.load(onnx_path)


# --------------------------------------------------------------------------- manifest contradictions
CONTRADICTIONS = {
    "preprocess shape": (lambda m: m["preprocess"].update(input_shape=[1, 16, 16]), "preprocess.input_shape"),
    "preprocess dtype": (lambda m: m["preprocess"].update(dtype="float64"), "preprocess.dtype"),
    "task": (lambda m: m.update(task="binary"), "differs from heads"),
    "labels": (lambda m: m.update(labels=["x", "y", "z"]), "labels differ"),
    "multi-head": (lambda m: m.update(task="multi-head"), "unnamed head"),
    "regression kind": (
        lambda m: m["heads"][0].update(task="regression") or m.update(task="regression", labels=None),
        "regression head",
    ),
}


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_contradicting_manifest_fields_are_refused(tmp_path, name):
    change, message = CONTRADICTIONS[name]
    path = save_bundle(tmp_path / "b", 3, labels=["a", "b", "c"])
    Predictor.load(path)
    _rewrite_json(path / "manifest.json", change)
    with pytest.raises(BundleError, match=message):
        trainfer.load(path)
    with pytest.raises(BundleError, match=message):
        Predictor.load(path)


def test_saving_contradicting_shapes_is_refused(tmp_path):
    with pytest.raises(trainfer.TrainferError, match="input_shape"):
        trainfer.save(
            trained(3),
            tmp_path / "b",
            factory=FACTORY,
            preprocess={"input_shape": [1, 16, 16]},
            example_inputs=torch.randn(1, 1, 8, 8),
        )
    assert not (tmp_path / "b").exists()


def test_probes_of_one_column_outputs_pass_where_they_were_chosen():
    """Chosen against the scale of the chosen samples: the load check passes on them by construction."""
    from trainfer.serve.served_checks import MAX_INT8_REL_ERROR, select_probes

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 1, 8, 8, generator=generator)
    reference = torch.randn(40, 1, generator=generator) * torch.linspace(0.1, 10, 40)[:, None]
    candidate = reference + 0.2 * torch.randn(40, 1, generator=generator)
    probes = select_probes(inputs, reference, candidate)
    chosen = [i for i in range(40) if any(torch.equal(inputs[i], p) for p in probes)]
    assert 0 < len(chosen) <= MAX_PROBES
    error = float((candidate[chosen] - reference[chosen]).abs().max())
    assert error <= MAX_INT8_REL_ERROR * float(reference[chosen].abs().max())
    classes = torch.nn.functional.one_hot(torch.arange(40) % 3, 3).float()
    assert len(select_probes(inputs, classes, classes.roll(1, 1))) == 0  # quantize then refuses to make the form


def test_a_declared_shape_the_model_cannot_run_is_refused_at_load(tmp_path):
    """Both shapes changed together (no contradiction between fields), but not what the model takes."""
    path = save_bundle(tmp_path / "b", 3)

    def reshape(manifest):
        manifest["input"]["shape"] = [1, 1, 9, 9]
        manifest["preprocess"]["input_shape"] = [1, 9, 9]

    _rewrite_json(path / "manifest.json", reshape)
    with pytest.raises(BundleError, match="fails on 8 probe inputs"):
        Predictor.load(path)
