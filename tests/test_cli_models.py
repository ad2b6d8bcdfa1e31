"""MODEL on the command line: every command that takes a model resolves the same spec kinds the same way.

The kinds (:mod:`trainfer.cli.model_spec`): a built-in model name, ``package.module:factory``, a bundle
directory; ``--weights`` for a factory's model; the recorded input shape unless ``--input-shape``.
A bad spec is one line on stderr and exit code 2, whatever the command.
"""

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import trainfer
from trainfer.cli import main
from trainfer.cli.model_spec import MODEL_HELP
from trainfer.models import digits_net
from trainfer.testing import TOLERANCE, randomize_batchnorm

#: Every command taking a MODEL, with the cheapest arguments that make it run (``{model}``, ``{out}`` filled in).
COMMANDS = {
    "deploy": ["deploy", "{model}", "-o", "{out}"],
    "verify": ["verify", "{model}", "{model}", "--random-inputs", "0"],
    "audit": ["audit", "{model}"],
    "inspect": ["inspect", "{model}"],
    "bench": ["bench", "--model", "{model}", "--forms", "train", "--rounds", "1", "--repeats", "1", "--warmup", "0"],
}


def small_net() -> nn.Module:
    """A factory outside trainfer (this module): digits_net at width 4, recording its input shape."""
    return digits_net(width=4)


def shapeless_net() -> nn.Module:
    """A factory whose model records nothing: commands need --input-shape."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def not_a_model() -> str:
    return "a string"


def invoke(command: str, model: str, tmp_path, *extra: str):
    arguments = [part.format(model=model, out=tmp_path / "out") for part in COMMANDS[command]]
    return CliRunner().invoke(main, [*arguments, *extra])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    return str(trainfer.save(randomize_batchnorm(digits_net(width=4)).eval(), tmp_path_factory.mktemp("m") / "b"))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["built-in", "factory", "bundle"])
def test_every_command_takes_every_spec_kind(command, kind, bundle, tmp_path):
    model = {"built-in": "digits_net", "factory": "test_cli_models:small_net", "bundle": bundle}[kind]
    extra = []
    if command == "verify" and kind != "bundle":  # two calls of a factory draw two different models
        weights = tmp_path / "w.safetensors"
        save_file((digits_net() if kind == "built-in" else small_net()).state_dict(), str(weights))
        extra = ["--reference-weights", str(weights), "--candidate-weights", str(weights)]
    result = invoke(command, model, tmp_path, *extra)
    assert result.exit_code == 0, result.output
    assert "error" not in result.output


def test_deploy_a_built_in_name_with_weights_computes_what_the_weights_do(tmp_path):
    torch.manual_seed(1)
    trained = randomize_batchnorm(digits_net()).eval()
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "deployed"
    arguments = ["deploy", "digits_net", "--weights", str(tmp_path / "w.safetensors"), "--input-shape", "2,1,8,8"]
    result = CliRunner().invoke(main, [*arguments, "-o", str(out)])
    assert result.exit_code == 0, result.output
    counts = {line.split()[0]: line.split()[1::2] for line in result.output.splitlines() if " -> " in line}
    parameters, buffers = (sum(t.numel() for t in tensors) for tensors in (trained.parameters(), trained.buffers()))
    assert counts["parameters"][0] == str(parameters) and counts["buffers"][0] == str(buffers)  # apart, not summed
    deployed = trainfer.load(out)
    assert trainfer.recipe_of(deployed).factory == "trainfer.models:digits_net"
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected, got = trained.double()(x), deployed.double()(x)
    assert (got - expected).abs().max() <= TOLERANCE[torch.float32] * expected.abs().max()


def test_the_recorded_input_shape_is_used_unless_given(bundle, tmp_path):
    recorded = invoke("inspect", bundle, tmp_path)
    assert recorded.exit_code == 0 and "1x32x8x8" not in recorded.output and "1x4x8x8" in recorded.output
    given = invoke("inspect", bundle, tmp_path, "--input-shape", "3,1,8,8")
    assert given.exit_code == 0 and "3x4x8x8" in given.output
    trained = invoke("inspect", bundle, tmp_path, "--modes", "train,eval")
    assert trained.exit_code == 0 and "2x4x8x8" in trained.output  # a batch of 2 for training BatchNorm


def test_a_bundle_naming_a_factory_that_is_not_allowed_needs_trust_for_every_command(tmp_path):
    bundle = str(trainfer.save(shapeless_net(), tmp_path / "b", factory="test_cli_models:shapeless_net"))
    for command in COMMANDS:
        refused = invoke(command, bundle, tmp_path, "--input-shape", "2,1,8,8")
        assert refused.exit_code == 2 and "refusing to build factory" in refused.output, (command, refused.output)
    trusted = invoke("audit", bundle, tmp_path, "--trust-factory")
    assert trusted.exit_code == 0, trusted.output


BAD_SPECS = {
    "no_such_model": "neither package.module:factory, an existing bundle path, nor a built-in model (digits_net",
    "no_such_module_xyz:make": "cannot import 'no_such_module_xyz'",
    "trainfer.models:nope": "has no attribute 'nope'",
    "test_cli_models:not_a_model": "returned str, not an nn.Module",
    "{empty}": "no trainfer bundle at",
    "{checkpoint}": "is a checkpoint, not a bundle: name the model that takes it, with --weights",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spec", BAD_SPECS)
def test_a_bad_spec_is_one_line_and_exit_2(command, spec, tmp_path):
    (tmp_path / "empty").mkdir()
    save_file(small_net().state_dict(), str(tmp_path / "w.safetensors"))
    result = invoke(command, spec.format(empty=tmp_path / "empty", checkpoint=tmp_path / "w.safetensors"), tmp_path)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert lines[-1].startswith("error: ") and BAD_SPECS[spec] in lines[-1], result.output
    assert "Traceback" not in result.output and result.output.count("error: ") == 1


def test_a_factory_module_in_the_current_directory_is_not_imported_and_the_error_says_how(tmp_path, monkeypatch):
    (tmp_path / "cwd_net_xyz.py").write_text("from torch import nn\ndef make(): return nn.Linear(2, 2)\n")
    (tmp_path / "broken_net_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    here = {"", ".", str(tmp_path)}
    monkeypatch.setattr("sys.path", [entry for entry in sys.path if entry not in here])
    missing = invoke("deploy", "cwd_net_xyz:make", tmp_path, "--input-shape", "1,2")
    assert missing.exit_code == 2 and "No module named 'cwd_net_xyz'" in missing.output
    assert "does not search the current directory" in missing.output and "PYTHONPATH=. trainfer" in missing.output
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH=. does
    broken = invoke("deploy", "broken_net_xyz:make", tmp_path, "--input-shape", "1,2")
    assert "No module named 'no_such_dependency_xyz'" in broken.output and "PYTHONPATH" not in broken.output
    assert invoke("deploy", "cwd_net_xyz:make", tmp_path, "--input-shape", "1,2").exit_code == 0


@pytest.mark.parametrize("command", [command for command in COMMANDS if command != "audit"])  # audit needs none
def test_a_model_recording_no_input_shape_needs_one(command, tmp_path):
    result = invoke(command, "test_cli_models:shapeless_net", tmp_path)
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert "records no input shape: --input-shape is required" in result.output.splitlines()[-1]


@pytest.mark.parametrize("command", ["deploy", "audit", "inspect", "bench"])
def test_weights_for_a_bundle_are_refused(command, bundle, tmp_path):
    save_file(digits_net(width=4).state_dict(), str(tmp_path / "w.safetensors"))
    result = invoke(command, bundle, tmp_path, "--weights", str(tmp_path / "w.safetensors"))
    assert result.exit_code == 2 and "is a bundle with its own weights; drop --weights" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_the_one_model_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "".join(MODEL_HELP.split()) in "".join(result.output.split())  # however click wraps it


def test_bench_names_a_built_in_model_by_its_factory(tmp_path):
    arguments = ["--json", str(tmp_path / "b.json"), "--threads", "1"]
    assert invoke("bench", "digits_net", tmp_path, *arguments).exit_code == 0
    assert json.loads((tmp_path / "b.json").read_text())["model"] == "trainfer.models:digits_net"


@pytest.mark.parametrize("flag", ["--weights", "--reference-weights", "--candidate-weights"])
def test_a_missing_checkpoint_is_named_as_a_file_not_a_bundle(flag, tmp_path):
    command = "verify" if flag != "--weights" else "deploy"
    result = invoke(command, "digits_net", tmp_path, flag, str(tmp_path / "nope.safetensors"))
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert f"error: {flag} file not found: '{tmp_path / 'nope.safetensors'}'" in result.output
    assert "bundle" not in result.output


def test_a_checkpoint_of_other_settings_says_how_to_build_them(tmp_path):
    save_file(digits_net(width=8).state_dict(), str(tmp_path / "w8.safetensors"))
    result = invoke("deploy", "digits_net", tmp_path, "--weights", str(tmp_path / "w8.safetensors"))
    assert result.exit_code == 2 and result.output.count("error: ") == 1, result.output
    assert "manifest" not in result.output  # a built-in name has no manifest
    assert "the factory 'trainfer.models:digits_net', config {}" in result.output
    assert "name a factory of yours that builds them, as package.module:factory" in result.output


def test_verify_notes_a_reference_built_with_random_weights(tmp_path):
    torch.manual_seed(0)
    save_file(randomize_batchnorm(digits_net(width=4)).state_dict(), str(tmp_path / "w.safetensors"))
    deployed = tmp_path / "deployed"
    arguments = ["deploy", "test_cli_models:small_net", "--weights", str(tmp_path / "w.safetensors")]
    assert CliRunner().invoke(main, [*arguments, "-o", str(deployed)]).exit_code == 0
    forgot = CliRunner().invoke(main, ["verify", "test_cli_models:small_net", str(deployed)])
    assert forgot.exit_code == 1, forgot.output
    assert "note: REFERENCE 'test_cli_models:small_net' was built with random initial weights" in forgot.output
    assert "--reference-weights" in forgot.output.splitlines()[-1] and "CANDIDATE" not in forgot.output
    given = ["--reference-weights", str(tmp_path / "w.safetensors")]
    passed = CliRunner().invoke(main, ["verify", "test_cli_models:small_net", str(deployed), *given])
    assert passed.exit_code == 0 and "note:" not in passed.output, passed.output
