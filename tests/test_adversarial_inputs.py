"""The attacker's inputs that used to end in a traceback or a plain Python exception (issue 22, section 6).

Every case here is an input someone who read only the docs would try: forged bundle files (JSON
nested 100,000 deep, an architecture naming ``forward``, ``Softmax(dim="x")``, int32 weights,
preprocessing for another model), hostile input files (PNG text-chunk bombs, ``.npy`` headers
declaring 1e12 samples, dates), hostile options (``--rtol nan``, a 3.6e9-element input shape)
and public API misuse (``top_k="3"``, ``trainfer.load(123)``). Each must end in a
:class:`trainfer.TrainferError` (CLI: one line, exit 2) naming what was expected and what was
given. Resource bombs run in a subprocess under ``resource.setrlimit`` (address space) and a
wall-clock limit: refused from the header or the option, they never allocate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file
from serving_models import trained
from time_limit import time_limit

import trainfer
from trainfer.cli import main
from trainfer.errors import BundleError, InputError, InputTypeError, TrainferError
from trainfer.jsonfile import MAX_JSON_DEPTH, json_depth, parse_json
from trainfer.serve import architecture
from trainfer.serve.readers import MAX_NPY_ELEMENTS

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
TESTS = Path(__file__).parent
SOURCE = Path(trainfer.__file__).parent.parent  # subprocesses run the trainfer under test
MEMORY_LIMIT = 3 * 2**30  # address space of a resource-bomb subprocess: torch loads, 1e12 samples do not


# --------------------------------------------------------------------------- bundles to forge
def _deploy_bundle(path: Path, task: str = "classification", outputs: int = 3, **preprocess) -> Path:
    deployed = trainfer.deploy(trained(0, outputs=outputs), X[:1])
    spec = {"input_shape": [1, 8, 8], **preprocess}
    return trainfer.save(deployed, path, example_inputs=X[:1], task=task, preprocess=spec)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _deploy_bundle(tmp_path_factory.mktemp("adversarial") / "deploy")


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adversarial") / "regression"
    return _deploy_bundle(path, "regression", 2, target_mean=[1.0, 2.0], target_std=[3.0, 4.0])


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    deployed = trainfer.deploy(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), torch.randn(1, 4))
    path = tmp_path_factory.mktemp("adversarial") / "table"
    return trainfer.save(deployed, path, example_inputs=torch.randn(1, 4), preprocess={"columns": list("abcd")})


def forge(bundle: Path, target: Path, edit=None, weights=None) -> Path:
    """A copy of ``bundle`` with its manifest (``edit``) or weights (``weights``) changed as an attacker
    would: the architecture digest and the weights' sha256 recomputed, so only the content is wrong."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    if weights is not None:
        state = load_file(str(target / "model.safetensors"))
        weights(state)
        save_file(state, str(target / "model.safetensors"))
        manifest["weights"]["sha256"] = hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()
    if edit is not None:
        edit(manifest)
    described = manifest["architecture"]
    described["sha256"] = architecture.digest({k: v for k, v in described.items() if k != "sha256"})
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_forged_copy_without_changes_loads_and_predicts_like_the_original(bundle, tmp_path):
    """The control for every forged bundle below: forging itself keeps a bundle valid."""
    copy = forge(bundle, tmp_path / "copy")
    expected = trainfer.Predictor.load(bundle).scores(X)
    torch.testing.assert_close(trainfer.Predictor.load(copy).scores(X), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- JSON bombs
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["runtime.json", "quantization.json"])
@pytest.mark.parametrize("text", [DEEP, '{"a": ' * 100_000 + "1" + "}" * 100_000], ids=["arrays", "objects"])
def test_bundle_json_nested_100000_deep_is_a_bundle_error(bundle, tmp_path, name, text):
    copy = forge(bundle, tmp_path / "b")
    (copy / name).write_text(text)
    with time_limit(60), pytest.raises(BundleError, match=f"{name}.*nest 100000 deep .at most {MAX_JSON_DEPTH}"):
        trainfer.Predictor.load(copy, runtime="recorded")


@pytest.mark.parametrize("name", ["manifest.json", "runtime.json", "quantization.json"])
@pytest.mark.parametrize(
    "text", ['{"runtime": "torch", "runtime": "onnxruntime"}', '{"a": {"runtime": 1, "runtime": 2}}']
)
def test_bundle_json_giving_a_key_twice_is_refused_not_resolved_to_the_last(bundle, tmp_path, name, text):
    copy = forge(bundle, tmp_path / "b")
    (copy / name).write_text(text)
    with pytest.raises(BundleError, match=f"{name}' is not valid JSON: the key 'runtime' is given twice"):
        trainfer.Predictor.load(copy, runtime="recorded")


def test_an_oversized_runtime_json_is_refused_unread(bundle, tmp_path):
    copy = forge(bundle, tmp_path / "b")
    with open(copy / "runtime.json", "w") as handle:
        handle.truncate(17 * 2**20)
    from trainfer.serve.runtime_schema import MAX_RECORD_BYTES

    with pytest.raises(BundleError, match=f"runtime.json' is larger than {MAX_RECORD_BYTES} bytes"):
        trainfer.Predictor.load(copy, runtime="recorded")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet='[]{}"\\ab'), inner, max_size=4),
    max_leaves=20,
)


def _depth(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max((_depth(child) for child in children), default=0)


@settings(max_examples=150, deadline=None)
@given(JSON_VALUES)
def test_json_depth_is_the_nesting_of_any_json_even_with_brackets_and_escapes_in_strings(value):
    assert json_depth(json.dumps(value).encode()) == _depth(value)


def test_json_nested_one_level_over_the_limit_is_refused_and_at_the_limit_parsed():
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    with pytest.raises(InputError, match=f"nest {MAX_JSON_DEPTH + 1} deep"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")


# --------------------------------------------------------------------------- input files
def _png_with_chunk(kind: bytes, size: int = 8 * 2**20) -> bytes:
    """An 8x8 PNG carrying a ``kind`` (zTXt or iCCP) chunk that inflates to ``size`` bytes."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    payload = (b"k\0\0" if kind == b"zTXt" else b"p\0\0") + zlib.compress(b"\0" * size, 9)
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    at = png.index(b"IDAT") - 4 if kind == b"iCCP" else png.rindex(b"IEND") - 4  # iCCP must precede the pixels
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_a_png_with_a_huge_compressed_chunk_is_an_input_error(bundle, tmp_path, kind):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_chunk(kind))
    with time_limit(60), pytest.raises(InputError, match="cannot read image .*bomb.png.*too large"):
        trainfer.Predictor.load(bundle).predict(str(path))


@pytest.mark.parametrize("dtype", ["datetime64[s]", "timedelta64[s]", "longdouble", "U3", "V8"])
def test_npy_of_non_numbers_is_an_input_error_naming_the_dtype(bundle, tmp_path, dtype):
    if np.dtype(dtype).itemsize <= 8 and dtype == "longdouble":
        pytest.skip("long double is float64 on this platform")
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 1, 8, 8), dtype=dtype))
    with pytest.raises(
        InputError, match=re.escape(f"x.npy': wrong dtype: expected real numbers, got numpy dtype {np.dtype(dtype)}")
    ):
        trainfer.Predictor.load(bundle).predict(str(path))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2"])
def test_big_endian_npy_predicts_like_the_same_numbers_in_native_order(bundle, tmp_path, dtype):
    values = (X * 100).round() if dtype == ">i2" else X
    native = values.numpy().astype(np.dtype(dtype).newbyteorder("="))
    np.save(tmp_path / "big.npy", native.astype(dtype))
    predictor = trainfer.Predictor.load(bundle)
    got = [r.to_record() for r in predictor.predict(str(tmp_path / "big.npy"), top_k=3)]
    expected = [r.to_record() for r in predictor.predict(native, top_k=3)]
    assert got == expected and len(got) == len(X)
    assert [r.to_record() for r in predictor.predict(native.astype(dtype), top_k=3)] == expected  # an array


def _npy_header(path: Path, shape: tuple[int, ...], data: bytes = b"\0" * 256) -> Path:
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.write(data)
    return path


@pytest.mark.parametrize("shape", [(-1, 1, 8, 8), (1, -1, 8, 8), (-(2**40), 1, 8, 8), (-1, -1, 8, 8)])
def test_a_negative_dimension_in_a_npy_header_is_refused_in_one_line_everywhere(bundle, tmp_path, shape):
    """``predict`` memory-maps a .npy: a header of shape (-1, 1, 8, 8) crashed there (exit 3), not in the server."""
    path = _npy_header(tmp_path / "neg.npy", shape)
    expected = f"neg.npy' declares shape {shape}: expected dimensions >= 0"
    assert expected in cli("predict", bundle, path)
    assert expected in cli("quantize", bundle, "--calibration", path, "-o", tmp_path / "q")
    with pytest.raises(InputError, match=re.escape(expected)):
        trainfer.Predictor.load(bundle).predict(str(path))


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((1,) * 65, "big.npy' declares a shape of 65 dimensions: expected at most 32 (numpy's limit)"),
        ((2**61, 0, 8, 8), "big.npy' declares shape (2305843009213693952, 0, 8, 8): its non-zero dimensions hold"),
    ],
)
def test_a_npy_shape_no_array_can_take_is_refused_by_the_rule_infer_uses(bundle, tmp_path, shape, expected):
    """The rule of ``/infer``'s shape check (``check_buildable_shape``), read from the header before ``np.load``."""
    path = _npy_header(tmp_path / "big.npy", shape, b"")
    assert expected in cli("predict", bundle, path)
    with pytest.raises(InputError, match=re.escape(expected)):
        trainfer.Predictor.load(bundle).predict(str(path))


def run_limited(code: str, seconds: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` with :data:`MEMORY_LIMIT` of address space and a wall-clock limit."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), str(TESTS)])}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit, env=env, timeout=seconds
    )


#: Resource bombs: each a statement run in one memory-limited subprocess, and what its error must say.
BOMBS = {
    "predict: .npy header of 1e12 samples": (
        "trainfer.Predictor.load(BUNDLE).predict(HUGE)",
        "InputError 'HUGE' declares shape (1000000000000, 1, 8, 8) of float32 (256000000000000 bytes) but holds 256",
    ),
    "predict: .npy of 2**30 + 64 elements (a 4 GiB sparse file)": (
        "trainfer.Predictor.load(BUNDLE).predict(SPARSE)",
        f"InputError 'SPARSE' holds {2**30 + 64} elements (shape (16777217, 1, 8, 8)): expected at most "
        f"{MAX_NPY_ELEMENTS}",
    ),
    "quantize: calibration .npy header of 1e12 samples": (
        "trainfer.quantize(BUNDLE, HUGE)",
        "InputError 'HUGE' declares shape (1000000000000, 1, 8, 8)",
    ),
    "deploy --input-shape 1,1,60000,60000": (
        "main(['deploy', BUNDLE, '-o', OUT, '--input-shape', '1,1,60000,60000'], standalone_mode=False)",
        "_OneLineError Invalid value for '--input-shape': "
        "expected at most 16777216 elements in all (trainfer.serve.manifest.MAX_ELEMENTS); "
        "got '1,1,60000,60000': 3600000000 elements",
    ),
}


@pytest.fixture(scope="module")
def bombs(bundle, tmp_path_factory) -> dict[str, str]:
    """Every :data:`BOMBS` statement run in one subprocess limited to 3 GiB: case -> what it raised."""
    directory = tmp_path_factory.mktemp("bombs")
    names = {
        "BUNDLE": str(bundle),
        "HUGE": str(_npy_header(directory / "huge.npy", (10**12, 1, 8, 8))),
        "SPARSE": str(_npy_header(directory / "sparse.npy", (2**24 + 1, 1, 8, 8), data=b"")),
        "OUT": str(directory / "out"),
    }
    with open(names["SPARSE"], "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) + (2**30 + 64) * 4)
    cases = {case: statement for case, (statement, _) in BOMBS.items()}
    code = f"""
import json, warnings, click, trainfer
from trainfer.cli import main
warnings.simplefilter("ignore")
{"; ".join(f"{key} = {value!r}" for key, value in names.items())}
outcomes = {{}}
for case, statement in {cases!r}.items():
    try:
        exec(statement)
        outcomes[case] = "no error"
    except (trainfer.TrainferError, click.ClickException) as error:
        outcomes[case] = type(error).__name__ + " " + " ".join(str(getattr(error, "message", error)).split())
    except BaseException as error:
        outcomes[case] = "UNEXPECTED " + type(error).__name__ + " " + str(error)[:300]
print(json.dumps(outcomes))
"""
    result = run_limited(code)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert not (directory / "out").exists()
    return {case: outcome.replace(names["SPARSE"], "SPARSE").replace(names["HUGE"], "HUGE") for case, outcome in
            outcomes.items()}  # fmt: skip


@pytest.mark.parametrize("case", BOMBS, ids=list(BOMBS))
def test_a_resource_bomb_is_refused_before_allocating(bombs, case):
    if "quantize" in case:
        pytest.importorskip("onnxruntime")
    assert BOMBS[case][1] in bombs[case]


# --------------------------------------------------------------------------- forged bundles
def _rename_module(old: str, new: str):
    def edit(manifest):
        modules = manifest["architecture"]["modules"]
        modules[new] = modules.pop(old)
        for node in manifest["architecture"]["nodes"]:
            if node["target"] == old:
                node["target"] = new

    return edit


def _softmax(dim):
    def edit(manifest):
        manifest["architecture"]["modules"]["5"] = {"type": "Softmax", "args": {"dim": dim}}

    return edit


def _preprocess(**fields):
    def edit(manifest):
        manifest["preprocess"].update(fields)

    return edit


FORGED_MANIFESTS = {
    "module named training": (_rename_module("2", "training"), r"expected a plain identifier .*found 'training'"),
    "module named __class__": (_rename_module("2", "__class__"), r"expected a plain identifier .*found '__class__'"),
    "module named forward": (_rename_module("2", "forward"), r"expected a plain identifier .*found 'forward'"),
    "nested module named forward": (_rename_module("2", "x.forward"), r"expected a plain identifier .*found 'forward'"),
    "Softmax(dim='x')": (_softmax("x"), "Softmax dim must be an integer, found 'x'"),
    "Softmax(dim=None, 'x')": (_softmax([None, "x"]), "Softmax dim must be an integer"),
    "3-channel mean on 1 channel": (_preprocess(mean=[0.1, 0.2, 0.3]), "mean holds 3 values for 1 channel"),
    "3-channel std on 1 channel": (_preprocess(std=[1.0, 2.0, 3.0]), "std holds 3 values for 1 channel"),
    "3-channel input_shape": (_preprocess(input_shape=[3, 8, 8]), r"input_shape \[3, 8, 8\] is not input.shape"),
}


@pytest.mark.parametrize("case", FORGED_MANIFESTS, ids=list(FORGED_MANIFESTS))
def test_a_forged_manifest_is_refused_at_load(bundle, tmp_path, case):
    edit, expected = FORGED_MANIFESTS[case]
    copy = forge(bundle, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=expected):
        trainfer.Predictor.load(copy)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_refused_at_load(bundle, tmp_path, dtype):
    def integers(state):
        name = next(key for key in state if key.endswith("weight"))
        state[name] = state[name].to(dtype)

    copy = forge(bundle, tmp_path / "b", weights=integers)
    with pytest.raises(BundleError, match=f"not float .1.: .*weight: expected a floating dtype, got {dtype}"):
        trainfer.load(copy)


@pytest.mark.parametrize("fixture", ["bundle", "regression"])
def test_weights_that_overflow_are_refused_at_load_naming_the_output(request, tmp_path, fixture):
    """Weights of 1e30 are finite (the weights check passes them) but the outputs overflow: refused at load on the
    probe inputs, in one line, rather than served with every request failing on its "input"."""

    def overflow(state):
        for name in state:
            if name.endswith("weight"):
                state[name] = state[name] * 1e30

    copy = forge(request.getfixturevalue(fixture), tmp_path / "b", weights=overflow)
    trainfer.load(copy)  # the weights themselves are finite
    message = r"the output holds \d+ non-finite value\(s\) .*expected finite outputs .* refusing to serve it$"
    with pytest.raises(BundleError, match=message) as refused:
        trainfer.Predictor.load(copy)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("key", ["target_std", "target_mean"])
@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [1.0] * 7])
def test_target_scaling_of_the_wrong_width_is_refused_at_load(regression, tmp_path, key, values):
    assert trainfer.Predictor.load(regression).predict(X[:1])  # the unforged bundle serves
    copy = forge(regression, tmp_path / "b", _preprocess(**{key: values}))
    with pytest.raises(BundleError, match=f"preprocess.{key} holds {len(values)} values for a regression output of 2"):
        trainfer.Predictor.load(copy)


# --------------------------------------------------------------------------- runtimes
def _onnx(path: Path, nodes, initializers, inputs) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers
    )
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert onnx.load(str(path), load_external_data=False) is not None
    return path


def test_an_onnx_runtime_allocation_failure_is_an_input_error(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from trainfer.serve.engines import ort_engine

    shape = numpy_helper.from_array(np.array([10**5, 10**5, 10**5], np.int64), "s")  # 4e15 bytes
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1])
    path = _onnx(tmp_path / "alloc.onnx", [helper.make_node("Expand", ["x", "s"], ["y"])], [shape], [x])
    engine = ort_engine(path, {"input": {"shape": [1, 1, 1], "dtype": "float32"}}, 1)
    with time_limit(60), pytest.raises(InputError, match="onnxruntime failed running .*alloc.onnx.*allocate"):
        engine(torch.ones(1, 1, 1))


def test_openvino_refusing_external_data_outside_the_model_directory_is_an_input_error(tmp_path):
    pytest.importorskip("openvino")
    from onnx import TensorProto, helper, numpy_helper

    from trainfer.serve.engines import OpenVinoEngine

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in {"location": "../../../../../etc/passwd", "offset": "0", "length": "48"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    (tmp_path / "m").mkdir()
    path = _onnx(tmp_path / "m" / "ext.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], [weight], [x])
    with pytest.raises(InputError, match="openvino cannot compile .*ext.onnx"):
        OpenVinoEngine(path, {"input": {"shape": [1, 4], "dtype": "float32"}}, 1)


# --------------------------------------------------------------------------- the command line
def cli(*arguments: str) -> str:
    """Run the CLI in-process; it must end in a one-line error with exit code 2; return the output."""
    result = CliRunner().invoke(main, [str(a) for a in arguments])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("option", ["--rtol", "--atol"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1e-5", "x"])
@pytest.mark.parametrize("command", ["deploy", "verify"])
def test_non_finite_or_negative_tolerances_are_invalid_options(bundle, tmp_path, command, option, value):
    target = ["-o", str(tmp_path / "out")] if command == "deploy" else [str(bundle)]
    output = cli(command, bundle, *target, f"{option}={value}")
    reason = "is not a number written in ASCII" if value == "x" else "expected a finite number"
    assert f"Invalid value for '{option}'" in output and reason in output
    assert not (tmp_path / "out").exists()


def test_a_zero_relative_tolerance_is_invalid_and_a_zero_absolute_one_valid(bundle, tmp_path):
    assert "expected a finite number > 0; got '0'" in cli("deploy", bundle, "-o", tmp_path / "out", "--rtol", "0")
    result = CliRunner().invoke(main, ["verify", str(bundle), str(bundle), "--atol", "0"])
    assert result.exit_code == 0, result.output


def test_verify_of_models_with_different_inputs_is_a_clear_error(bundle, table):
    output = cli("verify", bundle, table)
    assert "incompatible inputs: CANDIDATE" in output and "(4,)" in output and "(1, 8, 8)" in output


@pytest.mark.parametrize("kind", ["png", "objects", "floats", "dates"])
def test_quantize_labels_that_are_not_integer_class_indices_are_refused(bundle, tmp_path, kind):
    labels = tmp_path / f"labels.{'png' if kind == 'png' else 'npy'}"
    if kind == "png":
        labels.write_bytes(_png_with_chunk(b"zTXt", 1024))
    else:
        values = {"objects": np.array([{"a": 1}] * 4, dtype=object), "floats": np.zeros(4)}
        np.save(labels, values.get(kind, np.zeros(4, "datetime64[s]")), allow_pickle=True)
    np.save(tmp_path / "x.npy", X.numpy())
    output = cli("quantize", bundle, "--calibration", tmp_path / "x.npy", "-o", tmp_path / "q", "--labels", labels)
    expected = {
        "png": "expected a .npy file of integer class indices",
        "objects": "pickled Python objects, never loaded",
        "floats": "expected integer class indices, got numpy dtype float64",
        "dates": "expected real numbers, got numpy dtype datetime64[s]",
    }
    assert output.startswith("error: ") and expected[kind] in output, output
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_a_file_name_that_is_not_utf8_prints_escaped_on_a_strict_utf8_stream(bundle, tmp_path, fmt):
    name = os.fsdecode(b"bad\xff.png")
    try:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses file names that are not UTF-8")
    output = io.BytesIO()
    stream = io.TextIOWrapper(output, encoding="utf-8", errors="strict")
    with contextlib.redirect_stdout(stream):
        main(["predict", str(bundle), str(tmp_path / name), "--format", fmt], standalone_mode=False)
    stream.flush()
    assert b"bad\\xff.png" in output.getvalue() and output.getvalue().count(b"\n") == 2


# --------------------------------------------------------------------------- public API misuse
@pytest.fixture(scope="module")
def predictor(bundle):
    return trainfer.Predictor.load(bundle)


API_MISUSE = {
    "top_k='3'": (
        lambda p, b: p.predict(X, top_k="3"),
        InputTypeError,
        "top_k must be an integer >= 1 or None; got str '3'",
    ),
    "top_k=2.5": (
        lambda p, b: p.predict(X, top_k=2.5),
        InputTypeError,
        "top_k must be an integer >= 1 or None; got float 2.5",
    ),
    "top_k=True": (lambda p, b: p.predict(X, top_k=True), InputTypeError, "top_k must be an integer"),
    "top_k=0": (lambda p, b: p.predict(X, top_k=0), InputError, "top_k must be >= 1; got 0"),
    "load(123)": (
        lambda p, b: trainfer.load(123),
        InputTypeError,
        r"path must be a path \(str or os.PathLike\); got int 123",
    ),
    "load(None)": (lambda p, b: trainfer.load(None), InputTypeError, "path must be a path .* got NoneType None"),
    "Predictor.load(123)": (lambda p, b: trainfer.Predictor.load(123), InputTypeError, "path must be a path"),
    "batch_size='64'": (
        lambda p, b: trainfer.Predictor.load(b, batch_size="64"),
        InputTypeError,
        "batch_size must be an integer >= 1; got str '64'",
    ),
    "unknown keyword": (
        lambda p, b: trainfer.Predictor.load(b, bacth_size=64),
        InputTypeError,
        r"unknown keyword argument\(s\) \['bacth_size'\]",
    ),
    "labels=5": (lambda p, b: trainfer.Predictor.load(b, labels=5), InputTypeError, "labels must be .* got int 5"),
    "labels='abc'": (
        lambda p, b: trainfer.Predictor.load(b, labels="abc"),
        InputTypeError,
        "labels must be .* got str 'abc'",
    ),
    "preprocess='x'": (
        lambda p, b: trainfer.Predictor.load(b, preprocess="x"),
        InputTypeError,
        "preprocess must be a PreprocessSpec, a dict or None; got str 'x'",
    ),
    "threshold='0.5'": (
        lambda p, b: trainfer.Predictor.load(b, threshold="0.5"),
        InputTypeError,
        "threshold must be a number",
    ),
    "threshold=nan": (
        lambda p, b: trainfer.Predictor.load(b, threshold=float("nan")),
        InputError,
        "threshold must be a number in",
    ),
    "explain(target='cat')": (
        lambda p, b: p.explain(X[:1], target="cat"),
        InputTypeError,
        "target must be a class index .* got str 'cat'",
    ),
    "explain(target=1.5)": (lambda p, b: p.explain(X[:1], target=1.5), InputTypeError, "target must be a class index"),
    "ensemble of ints": (
        lambda p, b: trainfer.Predictor.ensemble([1, 2]),
        InputTypeError,
        "ensemble member 0 must be a Predictor; got int 1",
    ),
    "ensemble of 5": (
        lambda p, b: trainfer.Predictor.ensemble(5),
        InputTypeError,
        "predictors must be an iterable of Predictors; got int 5",
    ),
    "ensemble top_k=.2.": (
        lambda p, b: trainfer.Predictor.ensemble([p]).predict(X, top_k="2"),
        InputTypeError,
        "top_k must be an integer",
    ),
    "quantize(42, ...)": (
        lambda p, b: trainfer.quantize(42, X),
        InputTypeError,
        "model_or_bundle must be an nn.Module or a bundle path; got int 42",
    ),
}


@pytest.mark.parametrize("case", API_MISUSE, ids=list(API_MISUSE))
def test_public_api_misuse_is_a_trainfer_error_naming_parameter_expected_and_given(predictor, bundle, case):
    call, error, expected = API_MISUSE[case]
    if "explain" in case:
        pytest.importorskip("captum")
    with pytest.raises(error, match=expected) as raised:
        call(predictor, bundle)
    assert isinstance(raised.value, TrainferError)
    assert isinstance(raised.value, TypeError if error is InputTypeError else ValueError)  # old except clauses hold
