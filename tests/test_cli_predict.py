"""``trainfer predict`` and ``trainfer export`` end to end: files in, typed predictions out, exit codes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from click.testing import CliRunner
from PIL import Image
from torch import nn

import trainfer
from trainfer import Predictor
from trainfer.cli import main
from trainfer.testing import randomize_batchnorm

TESTS = Path(__file__).parent


def digits(classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, classes)
    )


def scorer() -> nn.Module:
    """A binary model on table rows that ends in a sigmoid."""
    return nn.Sequential(nn.Linear(3, 1), nn.Sigmoid(), nn.Flatten(0))


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = randomize_batchnorm(digits()).eval()
    spec = trainfer.PreprocessSpec(input_shape=(1, 8, 8), mean=[0.3], std=[0.6])
    trainfer.save(model, root / "bundle", factory=f"{__name__}:digits", labels=["cat", "dog", "eel"], preprocess=spec)
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / f"img{i}.png")
        images.append(str(root / f"img{i}.png"))
    return root, images


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "trainfer", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_predict_images_in_a_subprocess(image_bundle):
    root, images = image_bundle
    done = run_cli("predict", str(root / "bundle"), *images, "--top-k", "2", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    expected = Predictor.load(root / "bundle").predict(images, top_k=2)
    assert [r["id"] for r in records] == images
    assert_results_close([{k: v for k, v in r.items() if k != "id"} for r in records], expected)
    assert all(len(r["top_k"]) == 2 for r in records)


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_in_a_subprocess(image_bundle, tmp_path):
    root, _ = image_bundle
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    done = run_cli("predict", str(root / "bundle"), str(tmp_path / "wrong.npy"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "wrong channel count: expected 1" in done.stderr
    assert "wrong.npy' holds an array of shape (2, 3, 8, 8)" in done.stderr  # the file and its shape, named
    assert "Traceback" not in done.stderr


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_table_csv_and_npy(image_bundle, tmp_path):
    root, images = image_bundle
    table = invoke("predict", str(root / "bundle"), *images)
    lines = table.output.splitlines()
    assert table.exit_code == 0 and lines[0].split() == ["id", "index", "label", "probability", "top_k"]
    assert len(lines) == 4 and lines[1].startswith(images[0])
    pixels = np.stack(
        [np.asarray(Image.open(p).resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255 for p in images]
    )[:, None]
    np.save(tmp_path / "batch.npy", pixels)
    as_csv = invoke("predict", str(root / "bundle"), str(tmp_path / "batch.npy"), "--format", "csv", "--top-k", "3")
    rows = as_csv.output.splitlines()
    assert rows[0] == "id,index,label,probability,top_k" and rows[1].startswith(f"{tmp_path / 'batch.npy'}[0],")
    by_image = [
        json.loads(x)["label"]
        for x in invoke("predict", str(root / "bundle"), *images, "--format", "jsonl").output.splitlines()
    ]
    assert [row.split(",")[2] for row in rows[1:]] == by_image


def test_binary_csv_rows_and_threshold(tmp_path):
    torch.manual_seed(1)
    model = scorer()
    spec = {"columns": ["a", "b", "c"]}
    trainfer.save(
        model, tmp_path / "b", factory=f"{__name__}:scorer", task="binary", preprocess=spec, labels=["no", "yes"]
    )
    (tmp_path / "rows.csv").write_text("c,a,b\n1,2,3\n-4,0.5,6\n0,0,0\n")
    records = [
        json.loads(x)
        for x in invoke(
            "predict", str(tmp_path / "b"), str(tmp_path / "rows.csv"), "--threshold", "0.8", "--format", "jsonl"
        ).output.splitlines()
    ]
    with torch.no_grad():
        expected = model(torch.tensor([[2.0, 3.0, 1.0], [0.5, 6.0, -4.0], [0.0, 0.0, 0.0]]))
    assert [r["id"] for r in records] == [f"{tmp_path / 'rows.csv'}:{i}" for i in range(3)]
    np.testing.assert_allclose([r["probability"] for r in records], expected, atol=1e-6)
    assert [r["decision"] for r in records] == (expected >= 0.8).tolist()
    assert {r["threshold"] for r in records} == {0.8}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    failed = CliRunner().invoke(main, ["predict", str(tmp_path / "b"), str(tmp_path / "bad.csv")])
    assert failed.exit_code == 2 and "lacks column(s) ['c']" in failed.output


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_top_k_on_a_bundle_that_ranks_nothing_is_a_one_line_usage_error(tmp_path, task):
    torch.manual_seed(2)
    bundle = tmp_path / task
    trainfer.save(scorer(), bundle, factory=f"{__name__}:scorer", task=task, preprocess={"columns": ["a", "b", "c"]})
    (tmp_path / "rows.csv").write_text("a,b,c\n1,2,3\n")
    out = tmp_path / "preds.jsonl"
    for extra in ([], ["--out", str(out)]):
        failed = CliRunner().invoke(main, ["predict", str(bundle), str(tmp_path / "rows.csv"), "--top-k", "2", *extra])
        assert failed.exit_code == 2, failed.output
        assert failed.output == (
            f"error: --top-k applies to classification and sequence models only; this model's task is {task}: "
            "drop --top-k\n"
        )
    assert not out.exists()  # refused before anything was written
    assert invoke("predict", str(bundle), str(tmp_path / "rows.csv")).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png"], "input file not found"),
        (["notes.txt"], "expected image files, a .npy file or a .csv file"),
        (["broken.png"], "cannot read image"),
    ],
)
def test_bad_inputs_exit_2(image_bundle, tmp_path, args, message):
    root, _ = image_bundle
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    result = CliRunner().invoke(main, ["predict", str(root / "bundle"), *[str(tmp_path / a) for a in args]])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_not_a_bundle_exits_2_and_debug_shows_the_traceback(tmp_path, image_bundle):
    _, images = image_bundle
    result = CliRunner().invoke(main, ["predict", str(tmp_path), images[0]])
    assert result.exit_code == 2 and "no trainfer bundle" in result.output
    debug = CliRunner().invoke(main, ["--debug", "predict", str(tmp_path), images[0]])
    assert isinstance(debug.exception, trainfer.BundleError)


def test_export_then_predict_with_the_onnx_file(image_bundle, tmp_path):
    root, images = image_bundle
    onnx_file = str(tmp_path / "m.onnx")
    exported = invoke("export", str(root / "bundle"), "--format", "onnx", "-o", onnx_file, "--rtol", "1e-4")
    assert exported.exit_code == 0 and "max rel error" in exported.output and (tmp_path / "m.onnx").is_file()
    from_onnx = invoke("predict", str(tmp_path / "m.onnx"), *images, "--format", "jsonl").output.splitlines()
    from_bundle = invoke("predict", str(root / "bundle"), *images, "--format", "jsonl").output.splitlines()
    onnx_records, bundle_records = [json.loads(x) for x in from_onnx], [json.loads(x) for x in from_bundle]
    assert_results_close(onnx_records, bundle_records)  # ONNX Runtime vs torch: equal within rounding
    failed = CliRunner().invoke(main, ["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.onnx")])
    assert failed.exit_code == 2 and "no trainfer bundle" in failed.output
    negative = CliRunner().invoke(main, ["export", str(root / "bundle"), "-o", str(tmp_path / "y.onnx"), "--rtol=-1"])
    assert negative.exit_code == 2 and "'--rtol': expected a finite number > 0; got '-1'" in negative.output
    assert not (tmp_path / "y.onnx").exists()


def test_predict_names_the_form_serving_a_bundle_on_stderr_as_serve_does(tmp_path):
    """A default load follows runtime.json: predict says so on stderr, in the ready line's words; the
    bundle's plain PyTorch model goes unsaid, and stdout holds the records only."""
    from trainfer.serve import runtime as rt
    from trainfer.serve.runtime_record import save_record
    from trainfer.server.model import load_model

    bundle = shutil.copytree(TESTS / "fixtures" / "digits_deploy_v2", tmp_path / "b")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    args = ["predict", str(bundle), str(tmp_path / "x.npy"), "--format", "jsonl"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0 and plain.stderr == ""
    save_record(bundle, rt.compile(bundle, runtime="torch").record)  # what `trainfer compile` records
    recorded = CliRunner().invoke(main, args)
    served = load_model("b", bundle, runtime=None, trust_factory=False, max_batch=4).serving()
    assert recorded.stderr == f"serving {str(bundle)!r} on {served}\n" and served.endswith("recorded in runtime.json")
    assert [json.loads(line)["id"] for line in recorded.stdout.splitlines()] == [
        f"{tmp_path / 'x.npy'}[{i}]" for i in range(3)
    ]
    asked = CliRunner().invoke(main, [*args, "--runtime", "torch"])
    assert asked.stderr == f"serving {str(bundle)!r} on torch/float32, runtime 'torch' asked for\n"


def test_records_flatten_for_tables_and_csv():
    import io

    from trainfer.cli.predict import write_results
    from trainfer.serve.results import BinaryResult, ClassificationResult, MultiHeadResult, RegressionResult

    result = MultiHeadResult(
        {
            "digit": ClassificationResult(2, "two", 0.75, [("two", 0.75), ("one", 0.125)]),
            "size": RegressionResult([1.5, -2.0], ("w", "h")),
            "odd": BinaryResult(0.25, False, 0.5, None),
        }
    )
    out = io.StringIO()
    assert write_results([("a.png", result)], "csv", out) == 1
    header, row = out.getvalue().splitlines()
    assert header.split(",") == [
        "id",
        "digit.index",
        "digit.label",
        "digit.probability",
        "digit.top_k",
        "size.values",
        "size.named.w",
        "size.named.h",
        "odd.probability",
        "odd.decision",
        "odd.threshold",
    ]
    assert row == "a.png,2,two,0.75,two=0.75 one=0.125,1.5 -2,1.5,-2.0,0.25,False,0.5"
    table = io.StringIO()
    write_results([("a.png", result), ("b.png", result)], "table", table)
    lines = table.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["id", "digit.index", "digit.label"]
    jsonl = io.StringIO()
    write_results([("a.png", result)], "jsonl", jsonl)
    assert json.loads(jsonl.getvalue())["size"]["named"] == {"w": 1.5, "h": -2.0}
