"""Exit codes: user errors (trainfer's own, OSError on a user's path) are one line and exit 2; bugs keep
their traceback, say so and exit 3. Disk full while writing names the path and leaves nothing half-written.
"""

import ast
import errno
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

import trainfer
from trainfer import errors
from trainfer.cli import main
from trainfer.models import digits_net

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    return trainfer.save(digits_net().eval(), tmp_path_factory.mktemp("cli") / "digits")


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    last = result.output.splitlines()[-1]  # after a progress bar's lines, if one ran
    assert last.startswith("error: ") and result.output.count("error: ") == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in last, result.output


def test_an_internal_bug_keeps_its_traceback_and_says_it_is_a_bug(bundle, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")  # a bug inside trainfer, not a user error

    monkeypatch.setattr("trainfer.serve.bundle.load", broken)
    result = invoke("inspect", bundle)
    assert result.exit_code == 3
    assert "Traceback (most recent call last)" in result.output and "KeyError: 'boom'" in result.output
    assert "internal error in trainfer" in result.output and "please report it" in result.output


def test_a_trainfer_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    one_line_error(invoke("inspect", tmp_path), "no trainfer bundle at")
    result = invoke("--debug", "inspect", tmp_path)
    assert isinstance(result.exception, trainfer.BundleError)


@pytest.mark.parametrize("failure", [NO_SPACE, SafetensorError("Error while serializing: IoError(No space left)")])
@pytest.mark.parametrize("output", ["deployed", "deployed.safetensors"])
def test_disk_full_during_deploy_names_the_output_and_writes_nothing(bundle, tmp_path, monkeypatch, failure, output):
    import safetensors.torch

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / output
    one_line_error(invoke("deploy", bundle, "-o", out), f"cannot write {str(out)!r}")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_export_names_the_output_and_writes_nothing(bundle, tmp_path, monkeypatch):
    def full(path):
        raise NO_SPACE

    monkeypatch.setattr(trainfer.atomic, "fsync_file", full)
    out = tmp_path / "model.pt"
    one_line_error(invoke("export", bundle, "--format", "torchscript", "-o", out), f"cannot write {str(out)!r}")
    assert list(tmp_path.iterdir()) == []


class FullDisk:
    """A file handle on a full disk: every write fails."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        raise NO_SPACE

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_disk_full_during_predict_out_names_the_output(bundle, tmp_path, monkeypatch):
    import trainfer.serve.batch_predict as batch_predict

    def open_on_a_full_disk(path, mode="r", **kwargs):
        handle = open(path, mode, **kwargs)
        return FullDisk(handle) if "a" in mode else handle

    monkeypatch.setattr(batch_predict, "open", open_on_a_full_disk, raising=False)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "predictions.jsonl"
    one_line_error(invoke("predict", bundle, tmp_path / "x.npy", "--out", out), f"cannot write {str(out)!r}")


def test_every_trainfer_exception_is_a_trainfer_error():
    classes = [getattr(errors, name) for name in errors.__all__]
    raised = [cls for cls in classes if issubclass(cls, Exception) and not issubclass(cls, Warning)]
    assert len(raised) >= 10 and all(issubclass(cls, trainfer.TrainferError) for cls in raised)
    assert issubclass(trainfer.EquivalenceError, ValueError)
    assert not issubclass(trainfer.EquivalenceError, AssertionError)


def test_trainfer_raises_no_bare_builtin_value_type_or_import_errors():
    builtins = {"ValueError", "TypeError", "FileNotFoundError", "ImportError"}
    # pydantic validators must raise ValueError (reported per field)
    allowed = {"manifest.py", "runtime_schema.py", "quantization_schema.py"}
    found = []
    for path in Path(inspect.getfile(trainfer)).parent.rglob("*.py"):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if name in builtins:
                    found.append(f"{path.name}:{node.lineno} raise {name}")
    assert found == []


def test_the_command_line_prints_a_warning_as_one_line_without_its_source(monkeypatch):
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    assert CliRunner().invoke(main, ["verify", "--help"]).exit_code == 0
    shown = warnings.formatwarning(UserWarning("no validation\n  data"), UserWarning, "quantize.py", 78, "quantize(")
    assert shown == "warning: no validation data\n"


def _data(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    return data


OVERWRITING = {
    "prune": lambda b, d, o: ["prune", b, "-o", o, "--data", d, "--min-agreement", "0", "--no-search"],
    "quantize": lambda b, d, o: ["quantize", b, "--calibration", d, "-o", o],
    "export": lambda b, d, o: ["export", b, "-o", o],
    "deploy": lambda b, d, o: ["deploy", b, "-o", o],
    "predict": lambda b, d, o: ["predict", b, d, "--out", o],
}


@pytest.mark.parametrize("command", sorted(OVERWRITING))
@pytest.mark.parametrize("where", ["same", "inside", "symlink"])
def test_an_output_that_would_overwrite_an_input_is_refused_and_the_input_kept(bundle, tmp_path, command, where):
    data = _data(tmp_path)
    target = data if command == "predict" and where != "inside" else bundle  # predict's --out is a file
    if where == "symlink":
        (tmp_path / "link").symlink_to(target)
        output = tmp_path / "link"
    else:
        output = target / "sub" if where == "inside" else target
    before = {path: path.read_bytes() for path in [data, *Path(bundle).rglob("*")] if path.is_file()}
    result = invoke(*OVERWRITING[command](bundle, data, output))
    one_line_error(result)
    last = result.output.splitlines()[-1]  # export's FILE option refuses a directory before trainfer looks
    assert "would overwrite the input" in last or (command == "export" and "is a directory" in last), last
    after = {path: path.read_bytes() for path in [data, *Path(bundle).rglob("*")] if path.is_file()}
    assert after == before


#: The work each bundle-writing command does before it writes (patched to fail: a refusal must come first).
EXPENSIVE = {
    "deploy": "trainfer.reparam.deploy.deploy",
    "prune": "trainfer.serve.prune.prune",
    "quantize": "trainfer.serve.quantize.quantize",
}


def _users_files(output):
    (output / "NOTES.txt").write_text("notes")
    (output / "mydata").mkdir()
    (output / "mydata/f").write_text("x")


@pytest.mark.parametrize("command", sorted(EXPENSIVE))
@pytest.mark.parametrize(
    ("contents", "refusal"),
    [
        pytest.param(
            _users_files, "it also holds 'NOTES.txt', 'mydata', which are not files", id="a bundle + user files"
        ),
        pytest.param(lambda output: (output / "manifest.json").unlink(), "not a trainfer bundle", id="not a bundle"),
    ],
)
def test_an_output_bundle_holding_other_files_is_refused_before_any_work_and_kept(
    bundle, tmp_path, monkeypatch, command, contents, refusal
):
    """M5: `trainfer deploy digits -o ow` replaced the directory ow whole, deleting ow/NOTES.txt and ow/mydata."""
    output = tmp_path / "ow"
    shutil.copytree(bundle, output)
    contents(output)
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    monkeypatch.setattr(EXPENSIVE[command], lambda *args, **kwargs: pytest.fail(f"{command} worked before refusing"))
    one_line_error(invoke(*OVERWRITING[command](bundle, _data(tmp_path), output)), refusal)
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


def test_deploy_rewrites_a_bundle_that_holds_only_bundle_files(bundle, tmp_path):
    output = tmp_path / "ow"
    assert invoke("deploy", bundle, "-o", output).exit_code == 0
    (output / "runtime.json").write_text("{}")  # a bundle file, whatever it holds: trainfer replaces it
    result = invoke("deploy", bundle, "-o", output)
    assert result.exit_code == 0 and result.output.endswith(f"wrote {output}\n"), result.output
    assert sorted(path.name for path in output.iterdir()) == ["manifest.json", "model.safetensors"]


def test_a_factory_that_needs_arguments_is_a_user_error_but_a_typeerror_inside_it_is_a_bug(tmp_path, monkeypatch):
    (tmp_path / "factories_for_cli.py").write_text(
        "def needs(width):\n    raise AssertionError('never called')\ndef broken():\n    return len(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    output = tmp_path / "out"
    one_line_error(
        invoke("deploy", "os:system", "-o", output), "the factory os:system cannot be called without arguments"
    )
    one_line_error(invoke("deploy", "factories_for_cli:needs", "-o", output), "'width'")
    result = invoke("deploy", "factories_for_cli:broken", "-o", output)
    assert result.exit_code == 3 and "TypeError" in result.output, result.output
    assert not output.exists()


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_model_is_refused_not_read_as_the_current_directory(tmp_path, spec):
    one_line_error(invoke("deploy", spec, "-o", tmp_path / "out"), "MODEL is empty")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["deploy", "digits_net", "--input-shape", "abc", "-o", "x"], "Invalid value for '--input-shape'"),
        (["deploy", "digits_net", "--input-shape", "1,,8,8", "-o", "x"], "got '1,,8,8'"),  # not (1, 8, 8)
        (["deploy", "digits_net", "--input-shape", "1,8,8,", "-o", "x"], "got '1,8,8,'"),
        (["deploy", "digits_net", "--input-shape", "1,1,8,\u0668", "-o", "x"], "got '1,1,8,\\u0668'"),  # escaped
        (["deploy"], "Missing argument 'MODEL'"),
        (["deploy", "--no-such-option"], "No such option"),
        (["--no-such-option"], "No such option"),
        (["no-such-command"], "No such command"),
        (["prune", "b", "-o", "o", "--ratio", "2"], "Invalid value for '--ratio'"),
    ],
)
def test_a_click_usage_error_is_one_line_and_debug_keeps_clicks_form(args, fragment):
    result = invoke(*args)
    one_line_error(result, fragment)
    assert len(result.output.splitlines()) == 1 and "Usage:" not in result.output
    if args[0] != "--no-such-option":
        full = invoke("--debug", *args)
        assert full.exit_code == 2 and "Usage:" in full.output, full.output


def test_help_is_kept_and_a_bare_command_still_shows_it():
    for args in (["deploy", "--help"], ["--help"], []):
        result = invoke(*args)
        assert result.output.startswith("Usage: ") and "error:" not in result.output, result.output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-delay-ms", "inf"),
        ("--max-delay-ms", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "nan"),
        ("--header-timeout", "nan"),
        ("--header-timeout", "inf"),
        ("--header-timeout", "0"),
        ("--max-body-mb", "nan"),
        ("--max-body-mb", "1e308"),
        ("--max-batch", "100000"),
        ("--max-queue", "9999999999"),
        ("--batch-workers", "5000"),
        ("--workers", "5000"),
        ("--max-connections", "99999999"),
    ],
)
def test_every_numeric_serve_option_must_be_finite_and_bounded(bundle, option, value):
    pytest.importorskip("fastapi")
    one_line_error(invoke("serve", bundle, option, value), option)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_delay_ms", float("inf")),
        ("timeout", float("nan")),
        ("max_body", 2**40),
        ("max_batch", 0),
        ("max_queue", 1.5),
    ],
)
def test_server_settings_refuse_an_unbounded_number(field, value):
    pytest.importorskip("fastapi")
    from trainfer.server.state import ServerSettings

    with pytest.raises(errors.InputError, match=field):
        ServerSettings(bundles={}, **{field: value})


@pytest.mark.parametrize(
    ("key", "given"),
    [
        (" " * 24, "24 characters, 24 of them outside"),
        (" " + "k" * 23, "24 characters, 1 of them outside"),
        ("k" * 23 + "\n", "24 characters, 1 of them outside"),
        ("k" * 12 + "\x7f" + "k" * 11, "24 characters, 1 of them outside"),
        ("é" * 24, "24 characters, 24 of them outside"),
        ("k" * 15, "15 characters, 0 of them outside"),
        ("k" * 100_000, "100000 characters, 0 of them outside"),  # past the header limit: never sendable
    ],
)
def test_serve_refuses_an_api_key_no_client_can_send_in_one_line_before_serving(bundle, monkeypatch, key, given):
    """Header values lose their edge whitespace and carry ASCII only: such a key could never match."""
    pytest.importorskip("fastapi")
    served = []
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **options: served.append(settings.api_key))
    args = ["serve", str(bundle), "--api-key-env", "SERVE_KEY"]
    refused = CliRunner().invoke(main, args, env={"SERVE_KEY": key})
    one_line_error(refused, "--api-key-env SERVE_KEY", "at least 16 visible ASCII characters", f"got {given}")
    assert CliRunner().invoke(main, args, env={"SERVE_KEY": "k!~" * 6}).exit_code == 0
    assert served == ["k!~" * 6]


def test_serve_takes_allowed_hosts_as_names_without_ports_and_refuses_others_in_one_line(bundle, monkeypatch):
    pytest.importorskip("fastapi")
    served = []
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **options: served.append(settings))
    args = ["serve", str(bundle), "--allowed-hosts"]
    refused = CliRunner().invoke(main, [*args, "api.example.com:8000"])
    one_line_error(refused, "--allowed-hosts: 'api.example.com:8000' is not a host name", "no port")
    assert CliRunner().invoke(main, [*args, "API.example.com,10.0.0.7"]).exit_code == 0
    assert [(s.host, s.allowed_hosts) for s in served] == [("127.0.0.1", ("api.example.com", "10.0.0.7"))]


def test_serve_on_a_port_in_use_or_a_bad_host_is_one_line_before_loading(bundle, monkeypatch):
    pytest.importorskip("fastapi")
    import socket

    def never(*args, **kwargs):
        raise AssertionError("the models were loaded before the address was checked")

    monkeypatch.setattr("trainfer.server.run._log_access", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(
            invoke("serve", bundle, "--port", taken.getsockname()[1]),
            "cannot listen",
            "in use",
            "(choose another with --port)",
        )
    one_line_error(invoke("serve", bundle, "--host", "bad host!"), "--host 'bad host!'")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_input_that_is_not_a_regular_file_is_named_so_not_missing(bundle, tmp_path, kind):
    import os

    path = tmp_path / "x.npy"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    one_line_error(invoke("predict", bundle, path), "not a regular file")
    with pytest.raises(errors.InputError, match="not a regular file"):
        trainfer.Predictor.load(bundle).predict(path)


def test_threshold_on_a_bundle_without_a_binary_head_is_refused_not_ignored(bundle, tmp_path):
    samples = tmp_path / "x.npy"
    np.save(samples, np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    one_line_error(invoke("predict", bundle, samples, "--threshold", "0.5"), "--threshold", "classification")
    assert invoke("predict", bundle, samples).exit_code == 0


def test_top_k_above_the_class_count_is_refused_not_cut(bundle, tmp_path):
    samples = tmp_path / "x.npy"
    np.save(samples, np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    assert invoke("predict", bundle, samples, "--top-k", "10").exit_code == 0
    one_line_error(invoke("predict", bundle, samples, "--top-k", "11"), "top_k 11 is more than the 10 classes")


def test_serve_help_shows_the_bounds_the_server_checks():
    pytest.importorskip("fastapi")
    from trainfer.cli.serve import command
    from trainfer.server.state import LIMITS, ServerSettings

    ranges = {param.name: param.type for param in command.params}
    for field in ("max_batch", "max_delay_ms", "max_queue", "timeout", "header_timeout", "batch_workers"):
        assert (ranges[field].min, ranges[field].max) == LIMITS[field], field
    assert ranges["max_body_mb"].max == LIMITS["max_body"][1] / 2**20
    assert (ranges["max_connections"].min, ranges["max_connections"].max) == LIMITS["max_requests"]
    defaults = {param.name: param.default for param in command.params}
    assert defaults["header_timeout"] == ServerSettings.header_timeout
    assert "1<=x<=65536" in invoke("serve", "--help").output


def test_serve_names_an_unset_api_key_variable_as_unset(bundle, monkeypatch):
    """An --api-key-env variable that is not set is named as such, not as a key of 0 characters."""
    pytest.importorskip("fastapi")
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **options: None)
    monkeypatch.delenv("SERVE_KEY_UNSET", raising=False)
    refused = CliRunner().invoke(main, ["serve", str(bundle), "--api-key-env", "SERVE_KEY_UNSET"])
    one_line_error(refused, "--api-key-env SERVE_KEY_UNSET", "no such environment variable is set")


@pytest.fixture
def nothing_runs(monkeypatch):
    """The expensive work of bench, demo, verify, inspect and audit fails the test if a refused option reaches it."""

    def never(*args, **kwargs):
        raise AssertionError("the work started before the option was refused")

    for target in (
        "torch.set_num_threads",
        "trainfer.bench.benchmark",
        "trainfer.demo.pipeline.run",
        "trainfer.reparam.verify.verify",
        "trainfer.analysis.inspection.inspect",
        "trainfer.analysis.audit.audit",
    ):
        monkeypatch.setattr(target, never)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["bench", "--model", "digits_net", "--threads", "100000"], "--threads"),
        (["bench", "--model", "digits_net", "--threads", "0"], "--threads"),
        (["demo", "--threads", "100000", "--epochs", "1", "--subset", "10", "--no-sequences"], "--threads"),
        (["bench", "--model", "digits_net", "--rounds", "0"], "--rounds"),
        (["bench", "--model", "digits_net", "--rounds", "10001"], "--rounds"),
        (["bench", "--model", "digits_net", "--repeats", "0"], "--repeats"),
        (["bench", "--model", "digits_net", "--warmup", "-1"], "--warmup"),
        (["demo", "--epochs", "1000000"], "--epochs"),
        (["compile", "b", "--rounds", "0"], "--rounds"),
        (["prune", "b", "-o", "o", "--finetune-epochs", "1000000"], "--finetune-epochs"),
        (["bench", "--model", "digits_net", "--seed", "99999999999999999999999"], "--seed"),
        (["inspect", "digits_net", "--seed", str(2**64)], "--seed"),
        (["demo", "--seed", str(2**32)], "--seed"),
        (["audit", "digits_net", "--seed", str(2**64)], "--seed"),
        (["demo", "--seed", "-1"], "--seed"),
        (["bench", "--model", "digits_net", "--batch-size", "0"], "--batch-size"),
        (["predict", "b", "x.npy", "--batch-size", str(2**63)], "--batch-size"),
        (["prune", "b", "-o", "o", "--finetune-batch-size", str(2**63)], "--finetune-batch-size"),
        (["prune", "b", "-o", "o", "--round-to", "5000"], "--round-to"),
        (["verify", "digits_net", "digits_net", "--random-inputs", "1000000000"], "--random-inputs"),
        (["verify", "digits_net", "digits_net", "--random-inputs", "-1"], "--random-inputs"),
    ],
)
def test_a_count_seed_threads_or_size_option_out_of_range_is_one_line_before_any_work(nothing_runs, args, option):
    one_line_error(invoke(*args), f"Invalid value for '{option}'")


def test_bench_refuses_a_batch_of_more_input_elements_than_an_input_shape_may_have(nothing_runs):
    """2**24 elements, the bound of --input-shape: 2**20 digits samples of 64 pixels are 64 times more."""
    one_line_error(
        invoke("bench", "--model", "digits_net", "--batch-size", 2**20),
        "'--batch-size'",
        "at most 16777216 elements",
        "1048576 samples of shape (1, 8, 8): 67108864 elements",
    )


@pytest.mark.parametrize(
    ("extra", "blamed", "given"),
    [
        ([], "'--input-shape'", "8 samples (the default --batch-size 8) of shape (1, 4096, 4096)"),
        (["--batch-size", "8"], "'--batch-size' / '--input-shape'", "8 samples of shape (1, 4096, 4096)"),
    ],
)
def test_bench_blames_the_options_the_user_gave_for_too_large_a_batch(nothing_runs, extra, blamed, given):
    """Attacker round 4 L-C2: --input-shape alone was refused as an invalid --batch-size the user never gave."""
    result = invoke("bench", "--model", "digits_net", "--input-shape", "1,1,4096,4096", *extra)
    one_line_error(result, f"Invalid value for {blamed}:", f"got {given}: 134217728 elements")


def test_every_seed_threads_count_and_batch_size_option_shares_one_range():
    """One bound per kind of option across commands; the seed's within what torch.manual_seed takes."""
    from trainfer.bench import measure
    from trainfer.cli import common
    from trainfer.serve.manifest import MAX_CHANNELS, MAX_ELEMENTS

    kinds = {
        "seed": common.SEED,
        "threads": common.THREADS,
        "rounds": common.COUNT,
        "repeats": common.COUNT,
        "epochs": common.COUNT,
        "random_inputs": common.COUNT_OR_ZERO,
        "warmup": common.COUNT_OR_ZERO,
        "finetune_epochs": common.COUNT_OR_ZERO,
        "batch_size": common.BATCH_SIZE,
        "finetune_batch_size": common.BATCH_SIZE,
    }
    found = {
        (name, param.name): param.type
        for name, command in main.commands.items()
        for param in command.params
        if param.name in kinds
    }
    other = {key: given for key, given in found.items() if given is not kinds[key[1]]}
    assert len(found) >= 18 and other == {}, other
    assert common.MAX_BATCH_SIZE == MAX_ELEMENTS
    assert common.MAX_THREADS == measure.MAX_THREADS
    round_to = next(param.type for param in main.commands["prune"].params if param.name == "round_to")
    assert (round_to.min, round_to.max) == (1, MAX_CHANNELS)


@pytest.mark.parametrize("rows", [2, 2000])  # the failing write is the last flush, or one while predicting
def test_a_reader_that_leaves_ends_the_command_quietly(bundle, tmp_path, rows):
    """`trainfer predict ... | head -1`: no `error: Broken pipe`, exit status 141 as a shell shows SIGPIPE's."""
    samples = tmp_path / "x.npy"
    np.save(samples, np.zeros((rows, 1, 8, 8), np.float32))
    command = [sys.executable, "-m", "trainfer", "predict", str(bundle), str(samples), "--format", "jsonl"]
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as in a shell
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=buffered) as child:
        child.stdout.close()  # the reader leaves before the first line
        stderr = child.stderr.read()
        assert (child.wait(timeout=300), stderr) == (141, b"")


def test_the_demo_derives_its_seeds_within_torchs_range_from_the_largest_seed_and_epoch():
    """The demo seeds each epoch from ``(seed, epoch, rank)``: at the largest --seed and --epochs too."""
    from trainfer.cli.common import MAX_COUNT, SEED
    from trainfer.demo import data, train

    with torch.random.fork_rng():
        loaders = data.loaders(batch_size=4, seed=SEED.max, subset=8)
        train._seed_epoch(loaders.train, SEED.max, MAX_COUNT)  # the sampler's, the augmentation's, Dropout's
        assert len(next(iter(loaders.train))[0]) == 4


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["quantize", "{bundle}", "-o", "{out}"], "--min-agreement"),
        (["quantize", "{bundle}", "-o", "{out}"], "--max-accuracy-drop"),
        (["quantize", "{bundle}", "-o", "{out}"], "--max-rel-error"),
        (["prune", "{bundle}", "-o", "{out}"], "--ratio"),
        (["predict", "{bundle}", "x.npy"], "--threshold"),
        (["serve", "{bundle}"], "--timeout"),
    ],
)
def test_a_threshold_that_is_not_a_finite_number_is_refused_in_one_line(bundle, tmp_path, command, option, value):
    """NaN compares false with every bound: accepted, it would make a gate that can never fail."""
    args = [part.format(bundle=bundle, out=tmp_path / "out") for part in command]
    refused = CliRunner().invoke(main, [*args, option, value])
    expected = "is not a finite number" if value == "nan" else ("is not a finite number", "not in the range")
    assert refused.exit_code == 2, refused.output
    assert any(text in refused.output for text in ([expected] if isinstance(expected, str) else expected))
    assert "Traceback" not in refused.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["", "pngs"])
def test_predict_refuses_to_write_explanations_into_its_bundle(bundle, tmp_path, inside):
    """--explain DIR inside the bundle (or the bundle itself) would mix PNGs into it: refused first."""
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    before = sorted(p.name for p in Path(bundle).iterdir())
    target = Path(bundle) / inside if inside else Path(bundle)
    refused = CliRunner().invoke(main, ["predict", str(bundle), str(tmp_path / "x.npy"), "--explain", str(target)])
    one_line_error(refused, "--explain", "would overwrite the input")
    assert sorted(p.name for p in Path(bundle).iterdir()) == before


def test_predict_refuses_explanations_whose_file_names_would_be_too_long_before_any_work(bundle, tmp_path):
    """An input named with a 248-byte stem would be explained as ``000_<stem>.png``, 256 bytes: refused before
    predicting, and --explain's directory never made (round 9: predictions printed, DIR made, then the OS error)."""
    pytest.importorskip("captum")
    sample = tmp_path / ("s" * 248 + ".npy")
    np.save(sample, np.zeros((1, 1, 8, 8), np.float32))
    refused = CliRunner().invoke(main, ["predict", str(bundle), str(sample), "--explain", str(tmp_path / "maps")])
    one_line_error(refused, "--explain: an explanation would be written as '000_sss", "(256 bytes): expected a file")
    assert '"label"' not in refused.output and not (tmp_path / "maps").exists()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (",", "model name '': expected 1 to 128 ASCII letters"),
        ("a,a", "model names must differ"),
        ("a", "--names gives 1 names for 2"),
        ("..,a", "model name '..': expected"),  # round 8: URL paths resolve '..' away: no client could reach it
        ("a,.hidden", "model name '.hidden': expected"),
        ("a,\u0663", "model name '\u0663': expected"),  # an Arabic-Indic digit: str.isalnum, not ASCII
        ("a," + "n" * 129, "model name 'nnn"),
    ],
)
def test_serve_names_each_bad_model_name_for_what_it_is(bundle, monkeypatch, names, message):
    """Empty names are named as empty (not as duplicates), equal ones as equal, a count mismatch as such, and a
    name a URL path cannot carry as it is (``..``, a leading dot, non-ASCII, over 128 characters) as that."""
    pytest.importorskip("fastapi")
    monkeypatch.setattr("trainfer.server.run.serve", lambda settings, **options: pytest.fail("served"))
    refused = CliRunner().invoke(main, ["serve", str(bundle), str(bundle), "--names", names])
    one_line_error(refused, message)


def test_prune_bounds_the_fine_tuning_learning_rate(bundle, tmp_path):
    """A learning rate of 1e38 overflowed float32 inside the optimiser (an internal error): bounded to (0, 10]."""
    refused = CliRunner().invoke(main, ["prune", str(bundle), "-o", str(tmp_path / "out"), "--finetune-lr", "1e38"])
    assert refused.exit_code == 2 and "not in the range" in refused.output and not (tmp_path / "out").exists()


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("work", "args"),
    [
        ("trainfer.bench.benchmark", ["bench", "--model", "digits_net"]),
        ("trainfer.analysis.inspection.inspect", ["inspect", "digits_net"]),
        ("trainfer.analysis.audit.audit", ["audit", "digits_net", "--input-shape", "4,1,8,8"]),
        ("trainfer.reparam.deploy.deploy", ["deploy", "digits_net", "-o", "{tmp}/out"]),
    ],
)
def test_ctrl_c_ends_a_long_command_with_one_line_and_130(monkeypatch, tmp_path, work, args):
    """Attacker round 4 L-C4: long runs at the input bounds; Ctrl-C was click's "Aborted!" and exit 1 (a verdict)."""
    monkeypatch.setattr(work, interrupt)
    result = invoke(*[arg.format(tmp=tmp_path) for arg in args])
    assert (result.exit_code, result.output.splitlines()[-1:]) == (130, ["interrupted (Ctrl-C)"]), result.output
    assert result.output.count("interrupted") == 1 and "Aborted" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing half-written


def test_ctrl_c_while_writing_an_output_leaves_nothing_half_written(monkeypatch, tmp_path):
    monkeypatch.setattr("trainfer.cli.bench.json.dumps", interrupt)
    arguments = ["--rounds", "1", "--repeats", "1", "--warmup", "0", "--forms", "train", "--json", tmp_path / "b.json"]
    result = invoke("bench", "--model", "digits_net", *arguments)
    assert (result.exit_code, result.output.splitlines()[-1]) == (130, "interrupted (Ctrl-C)"), result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("threads", [0, -1, 100_000, 2.0, True])
def test_library_functions_refuse_thread_counts_the_cli_refuses(threads):
    """time_forward, compile and the demo's num_threads check what --threads bounds (100000 crashed OpenBLAS)."""
    from trainfer.bench.measure import MAX_THREADS, num_threads

    model, x = digits_net().eval(), torch.randn(1, 1, 8, 8)
    message = rf"threads must be an int from 1 to {MAX_THREADS}; got {threads!r}"
    before = torch.get_num_threads()
    with pytest.raises(errors.InputError, match=message):
        trainfer.bench.time_forward(model, x, threads=threads)
    with pytest.raises(errors.InputError, match=message):
        trainfer.compile(model, x, runtime="torch", threads=threads)
    with pytest.raises(errors.InputError, match=message), num_threads(threads):
        pass
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["inspect", "digits_net", "--input-shape", "١,١,٨,٨"], "--input-shape"),  # Arabic-Indic digits
        (["bench", "--model", "digits_net", "--batch-size", "١"], "--batch-size"),
        (["bench", "--model", "digits_net", "--rounds", "1_0"], "--rounds"),  # int() reads 10
        (["predict", "b", "x.npy", "--top-k", "٣"], "--top-k"),
        (["deploy", "digits_net", "--input-shape", "1,1,8,8_0", "-o", "x"], "--input-shape"),
    ],
)
def test_integer_options_take_only_ascii_digits(nothing_runs, args, option):
    """Attacker round 7: ``int()`` reads other scripts' digits and underscores; the command line does not."""
    one_line_error(invoke(*args), f"Invalid value for '{option}'")


def test_every_integer_option_parses_ascii_digits_only():
    """Every integer option of every command goes through the one parser (``common.IntRange``)."""
    from trainfer.cli import common

    integer = [
        (name, param.name, param.type)
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param.type, click.types.IntParamType)
    ]
    other = [(name, option) for name, option, kind in integer if not isinstance(kind, common.IntRange)]
    assert len(integer) >= 20 and other == [], other


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["serve", "b", "--max-body-mb", "٢"], "--max-body-mb"),  # Arabic-Indic 2: served a 2 MiB limit
        (["serve", "b", "--timeout", "١_٥"], "--timeout"),
        (["serve", "b", "--header-timeout", "1_0"], "--header-timeout"),  # float() reads 10
        (["serve", "b", "--max-delay-ms", "٥"], "--max-delay-ms"),
        (["verify", "b", "b", "--rtol", "١e-3"], "--rtol"),
        (["verify", "b", "b", "--atol", "0_0"], "--atol"),
        (["prune", "b", "-o", "o", "--ratio", "0.5\xa0"], "--ratio"),  # a no-break space
        (["predict", "b", "x.npy", "--threshold", "𝟎.5"], "--threshold"),  # mathematical bold zero
        (["predict", "b", "c", "x.npy", "--weights", "1_0,1"], "--weights"),
    ],
)
def test_real_number_options_take_only_ascii_numbers(nothing_runs, args, option):
    """Attacker round 8: ``float()`` read them as integer options no longer did; one line naming the text, escaped."""
    result = invoke(*args)
    one_line_error(result, f"Invalid value for '{option}'", "written in ASCII", ascii(args[-1]))


def test_every_real_number_option_parses_ascii_numbers_only():
    """Every real-number option of every command goes through the one parser (``trainfer.number_text.parse_float``,
    by ``common.FiniteFloatRange`` or ``common.Tolerance``): each takes ``0.5`` and refuses ``0_5`` and ``٠.٥``."""
    from trainfer.cli import common

    real = [
        (name, param.name, param.type)
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param.type, click.types.FloatParamType | common.Tolerance)
    ]
    other = [
        (name, option)
        for name, option, kind in real
        if not isinstance(kind, common.FiniteFloatRange | common.Tolerance)
    ]
    assert len(real) >= 20 and other == [], other
    for name, option, kind in real:
        assert kind.convert("0.5", None, None) == 0.5, (name, option)
        for text in ("0_5", "٠.٥"):
            with pytest.raises(click.BadParameter, match="written in ASCII"):
                kind.convert(text, None, None)


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("", "")])
def test_every_interpreter_the_command_starts_leaves_the_current_directory_off_its_path(monkeypatch, given, expected):
    """``trainfer`` sets ``PYTHONSAFEPATH=1`` for the interpreters it starts (torch inductor's compile workers
    and multiprocessing's run ``python -c``, which would put the current directory, say a downloaded
    bundle's folder, first on ``sys.path``: attacker round 12); a setting of the user's own is kept."""
    if given is None:
        monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONSAFEPATH", given)
    assert CliRunner().invoke(main, ["inspect", "--help"]).exit_code == 0
    assert os.environ["PYTHONSAFEPATH"] == expected
    child = subprocess.run([sys.executable, "-c", "import sys; print(sys.path[0])"], capture_output=True, text=True)
    assert (child.stdout.strip() == "") is (expected == "")  # -c puts '' (the current directory) first, or not
