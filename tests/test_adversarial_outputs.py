"""What trainfer writes for a user, attacked by a user who read the docs: table/CSV/JSON-lines
output, ``predict --out`` targets and resumes, empty inputs, wide CSVs, quantize's labels.

What must hold: a label or file name never forges a row nor reaches the terminal raw; ``--out``
never hangs, never reads a device, never appends one producer's records to another's; nothing
to predict is an error; every refusal is one line and exit code 2.
"""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from nodes import kind_named, make_node, node_state
from serving_models import save_bundle, write_pngs
from time_limit import time_limit

import trainfer
from trainfer.cli import main
from trainfer.cli.predict import printable
from trainfer.serve.batch_predict import predict_to_jsonl, producer_path

HOSTILE = [
    "cat\nimg99999.png  fake  1.0",  # a forged table row
    "\x1b[2J\x1b[31mdog\x1b[0m",  # clears the screen, turns red
    "owl\r\x00\t\u2028\u2029\u202e\x7f\x85",  # carriage return, NUL, separators, bidi override, DEL, NEL
]


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.output.count("error: ") == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def raw_controls(text: str) -> list[str]:
    return [c for c in text if c != "\n" and not c.isprintable()]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_bundle(tmp_path_factory.mktemp("hostile") / "b", 0, labels=HOSTILE)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_pngs(root, 3)
    (root / "img00000.png").rename(root / "evil\nname\x1b[1m.png")  # a file name is an id too
    return root


# --------------------------------------------------------------------------- labels and ids in outputs
def test_hostile_labels_and_names_are_escaped_in_the_table(bundle, images):
    result = invoke("predict", bundle, images, "--top-k", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + 3 and raw_controls(result.stdout) == []  # header + one line per image
    assert "\\x1b[31mdog" in result.stdout and "cat\\nimg99999.png" in result.stdout
    assert "evil\\nname\\x1b[1m.png" in result.stdout


def test_hostile_labels_are_escaped_in_csv_and_faithful_in_json_lines(bundle, images):
    result = invoke("predict", bundle, images, "--top-k", "3", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 3 and raw_controls(result.stdout) == []
    assert {row["label"] for row in rows} <= {printable(label) for label in HOSTILE}
    result = invoke("predict", bundle, images, "--top-k", "3", "--format", "jsonl")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and {record["label"] for record in records} <= set(HOSTILE)  # JSON escapes them itself
    assert {label for record in records for label, _ in record["top_k"]} == set(HOSTILE)


def test_printable_escapes_exactly_what_is_not_printable():
    assert printable("plain label 7 é 猫") == "plain label 7 é 猫"
    assert printable("a\nb\x1b[0m\u202e\udcff") == "a\\nb\\x1b[0m\\u202e\\xff"  # the OS byte 0xff


# --------------------------------------------------------------------------- --out targets
@pytest.mark.parametrize("target", ["/dev/full", "/dev/zero", "/dev/null", "fifo", "directory", "link to /dev/zero"])
def test_out_is_a_regular_file_or_a_new_path(bundle, images, tmp_path, target):
    path = {"fifo": tmp_path / "fifo", "directory": tmp_path / "d", "link to /dev/zero": tmp_path / "link"}.get(
        target, target
    )
    if target == "fifo":
        os.mkfifo(path)
    elif target == "directory":
        path.mkdir()
    elif target.startswith("link"):
        path.symlink_to("/dev/zero")
    with time_limit(60):  # a read of a pipe or of /dev/zero would never end
        result = invoke("predict", bundle, images, "--out", path)
    if target == "directory":  # refused by the option's own type
        assert result.exit_code == 2 and "is a directory" in result.output
        with pytest.raises(trainfer.InputError, match="is a directory: expected a new path"):
            predict_to_jsonl(trainfer.Predictor.load(bundle), images, path, progress=False)
    else:
        one_line_error(result, "--out", "expected a new path or a regular file")
    assert not producer_path(path).exists()


def test_out_dev_stdout_piped_is_refused_not_a_hang(bundle, images):
    done = subprocess.run(
        [sys.executable, "-m", "trainfer", "predict", str(bundle), str(images), "--out", "/dev/stdout"],
        capture_output=True,  # stdout is a pipe, as in `trainfer predict ... --out /dev/stdout | cat`
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "is a pipe" in done.stderr, done.stderr


# --------------------------------------------------------------------------- resuming another producer's file
def test_resume_refuses_other_options_another_bundle_or_no_record(bundle, images, tmp_path):
    out = tmp_path / "o.jsonl"
    assert invoke("predict", bundle, images, "--out", out, "--top-k", "2").exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:1]))  # as a crash leaves it
    before = out.read_bytes()
    one_line_error(invoke("predict", bundle, images, "--out", out, "--top-k", "3"), "top_k 2, not 3")
    other = save_bundle(tmp_path / "other", 1, labels=HOSTILE)
    one_line_error(invoke("predict", other, images, "--out", out, "--top-k", "2"), "models")
    one_line_error(invoke("predict", bundle, bundle, images, "--out", out, "--top-k", "2"), "models")
    # a classifier takes no threshold: refused before the record is read (resuming with one: the next test)
    thresholded = invoke("predict", bundle, images, "--out", out, "--top-k", "2", "--threshold", "0.3")
    one_line_error(thresholded, "--threshold applies to binary models only", "is classification: drop --threshold")
    assert out.read_bytes() == before  # refused, left untouched
    assert invoke("predict", bundle, images, "--out", out, "--top-k", "2").exit_code == 0  # the same producer resumes
    assert out.read_text().splitlines(keepends=True) == lines


def test_resume_needs_the_threshold_the_run_was_started_with(images, tmp_path):
    binary = save_bundle(tmp_path / "yesno", 1, task="binary", outputs=1, final="sigmoid")
    out = tmp_path / "o.jsonl"
    assert invoke("predict", binary, images, "--out", out, "--threshold", "0.3").exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and {json.loads(line)["threshold"] for line in lines} == {0.3}
    out.write_text("".join(lines[:1]))  # as a crash leaves it
    before = out.read_bytes()
    for other, given in ((["--threshold", "0.4"], "0.4"), ([], "None")):  # another threshold, or the bundle's own
        result = invoke("predict", binary, images, "--out", out, *other)
        one_line_error(result, "cannot resume", f"written with threshold 0.3, not {given};")
    assert out.read_bytes() == before  # refused, left untouched
    assert invoke("predict", binary, images, "--out", out, "--threshold", "0.3").exit_code == 0  # resumed
    assert out.read_text().splitlines(keepends=True) == lines


@pytest.mark.parametrize("record", ["missing", "fifo", "huge", "deep", "not an object", "other format"])
def test_a_hostile_producer_record_is_refused_quickly(bundle, images, tmp_path, record):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "img00001.png"}\n')
    sidecar = producer_path(out)
    if record == "fifo":
        os.mkfifo(sidecar)
    elif record == "huge":
        with open(sidecar, "wb") as handle:
            handle.truncate(1 << 34)  # 16 GiB, sparse: never read whole
    elif record == "deep":
        sidecar.write_text("[" * 50000 + "]" * 50000)
    elif record == "not an object":
        sidecar.write_text("[1, 2]")
    elif record == "other format":
        sidecar.write_text(json.dumps({"format": "trainfer-predictions", "records": "csv", "top_k": None}))
    with time_limit(60):
        result = invoke("predict", bundle, images, "--out", out)
    if record == "fifo":  # an output too (predict writes the record): refused as one, before the bundle loads
        one_line_error(result, "--out's record", "is a pipe: expected a new path or a regular file")
    else:
        one_line_error(result, "cannot resume", "use another --out or delete it")
    assert out.read_text() == '{"id": "img00001.png"}\n'


# --------------------------------------------------------------------------- nothing to predict
@pytest.mark.parametrize("content", ["empty", "no images", "empty npy"])
def test_nothing_to_predict_is_an_error(bundle, tmp_path, content):
    source = tmp_path / "in"
    source.mkdir()
    if content == "no images":
        (source / "notes.txt").write_text("x")
        (source / "sub").mkdir()
    if content == "empty npy":
        source = tmp_path / "x.npy"
        np.save(source, np.zeros((0, 1, 8, 8), dtype=np.float32))
    expected = "holds no samples" if content == "empty npy" else "no image files"
    one_line_error(invoke("predict", bundle, source), expected)
    one_line_error(invoke("predict", bundle, source, "--format", "jsonl"), expected)
    if content != "empty npy":
        one_line_error(invoke("predict", bundle, source, "--out", tmp_path / "o.jsonl"), "no image files")
        with pytest.raises(trainfer.InputError, match="no image files"):
            predict_to_jsonl(trainfer.Predictor.load(bundle), source, tmp_path / "p.jsonl", progress=False)


# --------------------------------------------------------------------------- wide CSVs
def test_sixty_thousand_named_columns_are_matched_in_linear_time(tmp_path):
    names = [f"c{i}" for i in range(60_000)]
    linear = torch.nn.Linear(len(names), 1).double()
    predictor = trainfer.Predictor(linear, task="regression", preprocess={"columns": names[::-1], "dtype": "float64"})
    source = tmp_path / "wide.csv"
    values = np.random.default_rng(0).random(len(names))
    source.write_text(",".join(names) + "\n" + ",".join(map(repr, values.tolist())) + "\n")
    with time_limit(60):  # quadratic matching took minutes
        predict_to_jsonl(predictor, source, tmp_path / "o.jsonl", progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    with torch.no_grad():
        expected = float(linear(torch.tensor(values[::-1].copy()).unsqueeze(0)))
    assert record["values"][0] == pytest.approx(expected, rel=1e-9)


def test_a_missing_column_among_sixty_thousand_is_named_in_a_bounded_message(tmp_path):
    names = [f"c{i}" for i in range(60_000)]
    predictor = trainfer.Predictor(torch.nn.Linear(2, 1), task="regression", preprocess={"columns": ["c1", "nope"]})
    source = tmp_path / "wide.csv"
    source.write_text(",".join(names) + "\n" + ",".join("1" for _ in names) + "\n")
    with time_limit(60), pytest.raises(trainfer.InputError, match=r"lacks column\(s\) \['nope'\]") as caught:
        predict_to_jsonl(predictor, source, tmp_path / "o.jsonl", progress=False)
    assert len(str(caught.value)) < 1000 and "and 59990 more" in str(caught.value)


# --------------------------------------------------------------------------- quantize's labels
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([99] * 8, r"in 0\.\.9 \(10 classes\); got 99"),
        ([-1] + [0] * 7, "got -1"),
        ([0.3] * 8, "integer class indices; got dtype float32"),
        ([True] * 8, "got dtype bool"),
        ([1] * 5, r"one class index per validation input \(8\): shape \(8,\) or \(8, 1\); got shape \(5,\)"),
        ([[1, 2]] * 4, r"shape \(8,\) or \(8, 1\); got shape \(4, 2\)"),  # not flattened into 8 labels
    ],
)
def test_quantize_refuses_labels_that_are_not_class_indices(labels, message):
    from trainfer.models import digits_net

    torch.manual_seed(0)
    samples = torch.rand(8, 1, 8, 8)
    with pytest.raises(trainfer.InputError, match=message):
        trainfer.quantize(digits_net().eval(), samples, validation=samples, labels=torch.tensor(labels))


# --------------------------------------------------------------------------- no output replaces a device
# Each command names a missing MODEL or BUNDLE: the refusal of its output must come first, before
# anything is loaded (an error about the model would mean the output was checked late, or never).
# ``{node}`` is the output; a directory output must be a new path or a directory, a file output a
# new path or a regular file. Nodes are private ones in tmp_path (tests/nodes.py).
OUTPUTS = {
    "bench --json": (["bench", "--model", "{missing}", "--json", "{node}"], "--json", "a regular file"),
    "bench --plot": (["bench", "--model", "{missing}", "--plot", "{node}"], "--plot", "a regular file"),
    "inspect --json": (["inspect", "{missing}", "--json", "{node}"], "--json", "a regular file"),
    "inspect --plot": (["inspect", "{missing}", "--plot", "{node}"], "--plot", "a regular file"),
    "export -o": (["export", "{missing}", "-o", "{node}"], "--output", "a regular file"),
    "deploy -o FILE.safetensors": (["deploy", "{missing}", "-o", "{node}.safetensors"], "--output", "a regular file"),
    "deploy -o DIR": (["deploy", "{missing}", "-o", "{node}"], "--output", "a directory"),
    "quantize -o": (["quantize", "{missing}", "--calibration", "{data}", "-o", "{node}"], "--output", "a directory"),
    "prune -o": (["prune", "{missing}", "-o", "{node}"], "--output", "a directory"),
    "migrate NEW": (["migrate", "{stub}", "{node}"], "NEW", "a directory"),
    "compile (runtime.json)": (["compile", "{stub}"], "", "a regular file"),
    "serve --write-runtime (runtime.json)": (
        ["serve", "{stub}", "--port", "0", "--compile", "--write-runtime"],
        "",
        "a regular file",
    ),
    "demo --out": (["demo", "--out", "{node}"], "--out", "a directory"),
    "predict --explain": (["predict", "{missing}", "{data}", "--explain", "{node}"], "--explain", "a directory"),
}


@pytest.mark.parametrize("kind", ["fifo", "character device", "link to a character device"])
@pytest.mark.parametrize("command", list(OUTPUTS))
def test_every_output_refuses_a_device_or_a_fifo_before_any_work(tmp_path, command, kind):
    arguments, option, expected = OUTPUTS[command]
    stub, data = tmp_path / "stub", tmp_path / "data.npy"  # stub: a directory that only looks like a bundle
    stub.mkdir()
    (stub / "manifest.json").write_text("{}")
    np.save(data, np.zeros((1, 1, 8, 8), np.float32))
    node = stub / "runtime.json" if "runtime.json" in command else tmp_path / "out"
    node = make_node(node.with_name(node.name + (".safetensors" if "safetensors" in command else "")), kind)
    before = node_state(node)
    places = {"missing": tmp_path / "missing", "data": data, "stub": stub, "node": tmp_path / "out"}
    with time_limit(60):  # a write into a FIFO nobody reads would never end
        result = invoke(*[argument.format(**places) for argument in arguments])
    refusal = f"is {kind_named(kind)}: expected a new path or {expected}"
    one_line_error(result, f"{option} {str(node)!r}".strip(), refusal)
    assert node_state(node) == before


@pytest.mark.parametrize("command", [command for command in OUTPUTS if "runtime.json" not in command])
def test_every_output_under_a_file_is_refused_naming_why_before_any_work(tmp_path, command):
    """Attacker round 4 L-W2: ``bench --json FILE/x.json`` ran its benchmark, then failed with "File exists"."""
    arguments, option, expected = OUTPUTS[command]
    data, file = tmp_path / "data.npy", tmp_path / "file"
    np.save(data, np.zeros((1, 1, 8, 8), np.float32))
    file.write_text("mine")
    places = {"missing": tmp_path / "missing", "data": data, "stub": tmp_path, "node": file / "out"}
    result = invoke(*[argument.format(**places) for argument in arguments])
    refusal = f"is under a file, not in a directory: expected a new path or {expected}"
    one_line_error(result, f"{option} '{file / 'out'}", refusal)  # out, or out.safetensors
    assert file.read_text() == "mine"


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
@pytest.mark.parametrize("name", ["000_data.png", "003_data_3.png"])  # one example per input; another count's name
def test_predict_refuses_an_explanation_file_it_may_write_before_loading(tmp_path, kind, name):
    """Attacker round 4 L-W1: a FIFO at ``DIR/000_data.png`` was refused only after the predictions were printed."""
    data, pngs = tmp_path / "data.npy", tmp_path / "pngs"
    np.save(data, np.zeros((1, 1, 8, 8), np.float32))
    pngs.mkdir()
    node = make_node(pngs / name, kind)
    (pngs / "000_other.png").symlink_to(node)  # a name no run of these inputs writes: left alone
    before = node_state(node)
    with time_limit(60):  # a write into a FIFO nobody reads would never end
        result = invoke("predict", tmp_path / "missing", data, "--explain", pngs)
    one_line_error(result, f"--explain {str(node)!r} is a pipe: expected a new path or a regular file")
    assert node_state(node) == before


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
@pytest.mark.parametrize("resumed", [False, True], ids=["new OUT", "OUT to resume"])
def test_out_whose_record_is_no_regular_file_is_refused_before_loading(tmp_path, kind, resumed):
    """``OUT.trainfer.json``, which ``predict --out`` writes beside OUT, was refused only after the bundle
    was loaded (found looking for outputs checked late, attacker round 4 L-W2)."""
    data, out = tmp_path / "data.npy", tmp_path / "o.jsonl"
    np.save(data, np.zeros((1, 1, 8, 8), np.float32))
    if resumed:
        out.write_text('{"id": "data.npy[0]"}\n')
    node = make_node(producer_path(out), kind)
    before = node_state(node)
    with time_limit(60):  # a read of a FIFO nobody writes would never end
        result = invoke("predict", tmp_path / "missing", data, "--out", out)
    one_line_error(result, f"--out's record {str(node)!r} is a pipe: expected a new path or a regular file")
    assert node_state(node) == before


@pytest.mark.parametrize("name", ["quantized.onnx", "probes.safetensors", "quantization.json"])
@pytest.mark.parametrize(
    "command",
    [
        ["compile", "{stub}", "--gate-data", "{data}"],
        ["serve", "{stub}", "--port", "0", "--compile", "--write-runtime", "--gate-data", "{data}"],
    ],
    ids=["compile", "serve --compile --write-runtime"],
)
def test_a_gated_search_refuses_an_int8_file_it_may_write_before_searching(tmp_path, name, command):
    """With --gate-data an int8 choice writes its files into the bundle: a FIFO there was refused only
    after the whole search (found grepping for outputs checked late, attacker round 4 L-W2)."""
    stub, data = tmp_path / "stub", tmp_path / "data.npy"
    stub.mkdir()
    (stub / "manifest.json").write_text("{}")  # refused if read: the check must come first
    np.save(data, np.zeros((1, 1, 8, 8), np.float32))
    node = make_node(stub / name, "fifo")
    before = node_state(node)
    with time_limit(60):
        result = invoke(*[argument.format(stub=stub, data=data) for argument in command])
    one_line_error(result, f"{str(node)!r} is a pipe: expected a new path or a regular file")
    assert node_state(node) == before


def test_the_bundle_digest_predict_records_never_waits_on_a_fifo_swapped_in(tmp_path, monkeypatch):
    """predict --out records a digest of the bundle's metadata files: it looked at each (a regular file),
    then opened it by name, so a FIFO put there in between blocked predict forever."""
    from pathlib import Path

    from trainfer.cli.predict import model_digest

    manifest = save_bundle(tmp_path / "b", 3) / "manifest.json"
    is_file = Path.is_file

    def look_then_swap(path):
        found = is_file(path)
        if path == manifest:
            manifest.unlink()
            os.mkfifo(manifest)
        return found

    monkeypatch.setattr(Path, "is_file", look_then_swap)
    with time_limit(30), pytest.raises(trainfer.BundleError, match="manifest.json' is a pipe: expected a regular"):
        model_digest(str(manifest.parent))


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
@pytest.mark.parametrize(
    "command",
    [["compile", "{stub}"], ["serve", "{stub}", "--port", "0", "--compile", "--write-runtime"]],
    ids=["compile", "serve --compile --write-runtime"],
)
def test_a_search_refuses_a_quantization_json_that_is_not_a_regular_file_before_searching(tmp_path, command, kind):
    """Without --gate-data compile only reads quantization.json (to decide whether an int8 form it wrote is
    retired): one that was not a regular file was skipped quietly, while every load refuses it."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "manifest.json").write_text("{}")  # refused if read: the check must come first
    node = make_node(stub / "quantization.json", kind)
    before = node_state(node)
    with time_limit(60):
        result = invoke(*[argument.format(stub=stub) for argument in command])
    one_line_error(result, f"{str(node)!r} is {kind_named(kind)}: expected a regular file")
    assert node_state(node) == before
