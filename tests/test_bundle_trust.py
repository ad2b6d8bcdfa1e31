"""A bundle is untrusted input: it never runs code the user did not allow, and bad manifests are named.

Covers issue 13, section 1: the factory allow-list (register_model, entry points, factory=,
trust_factory), the manifest schema (types, bounds, versions, missing preprocess) with a property
test that mutates valid manifests field by field, and the mode a loaded model comes back in.
"""

import asyncio
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_models import tiny_net
from torch import nn

import trainfer
from trainfer import BundleError, BundleWarning
from trainfer.cli import main
from trainfer.registry import factory_name
from trainfer.serve.architecture import digest
from trainfer.testing import randomize_batchnorm

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@trainfer.register_model
def trust_net(classes: int = 3, width: int = 4) -> nn.Module:
    """The serving tests' tiny CNN (1x8x8 inputs), registered: bundles may name it."""
    return tiny_net(outputs=classes, width=width)


def unregistered_net(classes: int = 3) -> nn.Module:
    """The same CNN, not registered: a bundle naming it is refused until it is."""
    return tiny_net(outputs=classes)


def trained(factory=trust_net, **config) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(factory(**config)).eval()


def save(path: Path, factory=trust_net, **config) -> Path:
    model = trained(factory, **config)
    return trainfer.save(model, path, factory=factory_name(factory), config=config, example_inputs=X[:1])


def rewrite(bundle: Path, **changes) -> Path:
    """Change top-level manifest keys of ``bundle`` (``None`` deletes the key)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module ``trust_evil_mod`` on sys.path whose import (or call) creates a marker file."""
    marker = tmp_path / "pwned"
    (tmp_path / "trust_evil_mod.py").write_text(
        textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).touch()

        def factory(**config):
            pathlib.Path({str(marker)!r}).touch()
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trust_evil_mod", raising=False)
    yield marker
    sys.modules.pop("trust_evil_mod", None)


# --------------------------------------------------------------------------- the allow-list
@pytest.mark.parametrize(
    ("factory", "config"),
    [
        ("os:system", {"command": "touch {marker}"}),
        ("subprocess:run", {"args": "touch {marker}", "shell": True}),
        ("shutil:rmtree", {"path": "{victim}"}),
        ("trust_evil_mod:factory", {}),
    ],
)
def test_a_bundle_naming_any_other_factory_is_refused_before_any_import(tmp_path, evil_module, factory, config):
    victim = tmp_path / "victim"
    victim.mkdir()
    bundle = save(tmp_path / "b")
    filled = {k: v.format(marker=evil_module, victim=victim) if isinstance(v, str) else v for k, v in config.items()}
    rewrite(bundle, factory=factory, config=filled)
    for load in (trainfer.load, trainfer.Predictor.load):
        with pytest.raises(BundleError, match=rf"refusing to build factory '{factory}'.*register_model.*trust_factory"):
            load(bundle)
    assert not evil_module.exists() and victim.is_dir() and "trust_evil_mod" not in sys.modules


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "{b}", "{x}"],
        ["deploy", "{b}", "-o", "{out}"],
        ["verify", "{b}", "{b}"],
        ["inspect", "{b}"],
        ["bench", "--model", "{b}", "--forms", "train", "--rounds", "1", "--repeats", "1", "--warmup", "0"],
        ["export", "{b}", "-o", "{out}.onnx"],
    ],
)
def test_every_command_refuses_the_bundle_in_one_line_exit_2(tmp_path, command):
    marker = tmp_path / "pwned"
    bundle = rewrite(save(tmp_path / "b"), factory="os:system", config={"command": f"touch {marker}"})
    (tmp_path / "x.npy").write_bytes(b"")  # never read: the bundle is refused first
    args = [part.format(b=bundle, x=tmp_path / "x.npy", out=tmp_path / "out") for part in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "refusing to build factory 'os:system'" in result.output
    assert "--trust-factory" in result.output and not marker.exists()
    ways = result.output.partition("In Python:")  # the command line's ways first: code is no way there
    assert (
        "--trust-factory" in ways[0] and "'trainfer.models' entry-point group" in ways[0] and "PYTHONPATH=." in ways[0]
    )
    assert "register_model" in ways[2] and "register_model" not in ways[0]


def test_a_registered_user_factory_reloads_and_an_unregistered_one_is_refused(tmp_path):
    bundle = save(tmp_path / "b", unregistered_net, classes=4)
    assert json.loads((bundle / "manifest.json").read_text())["factory"] == f"{__name__}:unregistered_net"
    with pytest.raises(BundleError, match="unregistered_net"):
        trainfer.load(bundle)
    trainfer.register_model(unregistered_net)
    loaded = trainfer.load(bundle)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), trained(unregistered_net, classes=4)(X))


def test_register_model_takes_a_short_name(tmp_path):
    @trainfer.register_model(name="trust_tests_short_net")
    def short(classes: int = 3) -> nn.Module:
        return tiny_net(outputs=classes)

    with pytest.raises(BundleError, match="refusing to build factory 'trust_tests_other_net'"):
        trainfer.load(rewrite(save(tmp_path / "b"), factory="trust_tests_other_net"))
    loaded = trainfer.load(rewrite(tmp_path / "b", factory="trust_tests_short_net"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), trained()(X))


def test_an_installed_entry_point_is_allowed_and_only_imported_when_named(tmp_path, monkeypatch):
    package = tmp_path / "site"
    (package / "trust_plugin_nets.py").parent.mkdir()
    (package / "trust_plugin_nets.py").write_text(
        "import sys\nfrom serving_models import tiny_net\nIMPORTED = True\n\n"
        "def plugin_net(classes=3, width=4):\n    return tiny_net(outputs=classes, width=width)\n"
    )
    info = package / "trust_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trust-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[trainfer.models]\nplugin_net = trust_plugin_nets:plugin_net\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "trust_plugin_nets", raising=False)
    bundle = save(tmp_path / "b")
    with pytest.raises(BundleError):
        trainfer.load(rewrite(bundle, factory="trust_plugin_nets:other"))
    assert "trust_plugin_nets" not in sys.modules  # names were read, nothing imported
    for name in ("trust_plugin_nets:plugin_net", "plugin_net"):
        loaded = trainfer.load(rewrite(bundle, factory=name))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(X), trained()(X))
    assert "trust_plugin_nets" in sys.modules
    sys.modules.pop("trust_plugin_nets")


def test_an_explicit_factory_builds_any_bundle(tmp_path):
    bundle = rewrite(save(tmp_path / "b", classes=5), factory="someone_elses.module:net")
    for factory in (unregistered_net, f"{__name__}:unregistered_net"):
        loaded = trainfer.load(bundle, factory=factory)
        assert trainfer.recipe_of(loaded).factory == "someone_elses.module:net"
        with torch.no_grad():
            assert torch.equal(loaded.eval()(X), trained(classes=5)(X))
    predictor = trainfer.Predictor.load(bundle, factory=unregistered_net)
    reference = trainfer.Predictor(trained(classes=5))
    assert [r.to_record() for r in predictor.predict(X)] == [r.to_record() for r in reference.predict(X)]


def test_trust_factory_opts_in_to_running_the_named_code(tmp_path, evil_module):
    bundle = rewrite(save(tmp_path / "b"), factory="trust_evil_mod:factory", config={})
    with pytest.raises(BundleError, match="returned NoneType"):
        trainfer.load(bundle, trust_factory=True)
    assert evil_module.exists()


def test_cli_trust_factory_flag_loads_a_bundle_of_an_unregistered_importable_factory(tmp_path):
    bundle = rewrite(save(tmp_path / "b", unregistered_net), factory="serving_models:trained", config={"seed": 0})
    refused = CliRunner().invoke(main, ["inspect", str(bundle)])
    assert refused.exit_code == 2 and "refusing to build factory 'serving_models:trained'" in refused.output
    trusted = CliRunner().invoke(main, ["inspect", str(bundle), "--trust-factory"])
    assert trusted.exit_code == 0, trusted.output


# --------------------------------------------------------------------------- the schema
@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"input": "x"}, "input", "valid dictionary"),
        ({"weights": []}, "weights", "valid dictionary"),
        ({"heads": "x"}, "heads", "valid list"),
        ({"format_version": "2"}, "format_version", "valid integer"),
        ({"preprocess": "x"}, "preprocess", "valid dictionary"),
        ({"factory": 7}, "factory", "valid string"),
        ({"factory": "os.system; rm -rf /"}, "factory", "should match pattern"),
        ({"form": "eval"}, "form", "'train' or 'deploy'"),
        ({"config": {"classes": 10**12}}, "config", "outside"),
        ({"config": {"a": [[[[[[[[[[1]]]]]]]]]]}}, "config", "deeper"),
        ({"input": {"shape": [1, 3, 65536, 65536], "dtype": "float32"}}, "input.shape", "over the limit"),
        ({"input": {"shape": [1, -3], "dtype": "float32"}}, "input.shape.1", "greater than or equal to 1"),
        ({"labels": ["x" * 5000]}, "labels", "at most 1000"),
        ({"config": [1]}, "config", "valid dictionary"),
        ({"config": None}, "config", "required field is missing"),
        ({"input": None}, "input", "required field is missing"),
        ({"versions": {"trainfer": "latest"}}, "versions.trainfer", "pattern"),
        ({"weights": {"file": "../../etc/passwd.safetensors", "sha256": "0" * 64}}, "weights.file", "pattern"),
    ],
)
def test_bad_manifest_fields_are_named_with_expected_and_found(tmp_path, change, field, expected):
    bundle = rewrite(save(tmp_path / "b"), **change)
    with pytest.raises(BundleError) as caught:
        trainfer.load(bundle)
    message = str(caught.value)
    assert f"{field}:" in message and expected in message and ("found" in message or "missing" in message), message


@pytest.mark.parametrize(("field", "value"), [("mean", "x"), ("std", [1, "a"]), ("pixel_scale", float("inf"))])
def test_bad_preprocess_values_are_named(tmp_path, field, value):
    bundle = save(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    rewrite(bundle, preprocess={**manifest["preprocess"], field: value})
    with pytest.raises(BundleError, match=rf"preprocess\.{field}"):
        trainfer.Predictor.load(bundle)


def test_std_zero_is_named_under_preprocess(tmp_path):
    bundle = save(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    rewrite(bundle, preprocess={**manifest["preprocess"], "std": [0.0]})
    with pytest.raises(BundleError, match="preprocess: std must be non-zero"):
        trainfer.load(bundle)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"format": "trainfer-bundle", "format_version": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[1, 2]", "not a trainfer manifest"),
    ],
)
def test_hostile_json_is_a_bundle_error(tmp_path, text, expected):
    bundle = save(tmp_path / "b")
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=expected):
        trainfer.load(bundle)


def test_non_finite_numbers_in_the_manifest_are_refused(tmp_path):
    bundle = save(tmp_path / "b")
    text = (bundle / "manifest.json").read_text().replace('"config": {}', '"config": {"classes": NaN}')
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="config.*not finite"):
        trainfer.load(bundle)


def test_a_config_that_builds_a_huge_model_is_refused_before_allocating(tmp_path):
    bundle = rewrite(save(tmp_path / "b"), config={"classes": 2**31})  # 64 x 2**31 floats: 512 GiB
    with pytest.raises(BundleError, match="refusing to allocate"):
        trainfer.load(bundle)


def test_an_oversized_manifest_is_refused_unread(tmp_path):
    bundle = save(tmp_path / "b")
    with open(bundle / "manifest.json", "a") as handle:
        handle.write(" " * (17 * 2**20))
    with pytest.raises(BundleError, match="larger than"):
        trainfer.load(bundle)


def test_a_manifest_without_preprocess_warns(tmp_path):
    bundle = rewrite(save(tmp_path / "b"), preprocess=None)
    with pytest.warns(BundleWarning, match="no preprocess section.*without normalisation"):
        trainfer.Predictor.load(bundle)


def test_a_bundle_from_a_newer_trainfer_warns_and_a_newer_format_is_refused(tmp_path):
    bundle = save(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    rewrite(bundle, versions={**manifest["versions"], "trainfer": "99.1.0"})
    with pytest.warns(BundleWarning, match="newer trainfer: 99.1.0, this is 0.1.0"):
        trainfer.load(bundle)
    rewrite(bundle, versions={**manifest["versions"], "trainfer": "0.1.7"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainfer.load(bundle)  # same major.minor: silent
    rewrite(bundle, format_version=3, versions={**manifest["versions"], "trainfer": "99.1.0"}, weights=None)
    with pytest.raises(BundleError, match=r"format_version 3; this trainfer reads up to 2 \(written by trainfer 99.1"):
        trainfer.load(bundle)
    rewrite(bundle, format_version=2, future_field=1)
    with pytest.raises(BundleError, match="future_field.*written by a newer trainfer"):
        trainfer.load(bundle)


def test_a_deploy_form_bundle_loads_in_eval_mode(tmp_path):
    deployed = trainfer.deploy(trained(), X)
    trainfer.save(deployed, tmp_path / "d", factory=factory_name(trust_net), example_inputs=X[:1])
    loaded = trainfer.load(tmp_path / "d")
    assert not any(module.training for module in loaded.modules())
    save(tmp_path / "t")
    assert trainfer.load(tmp_path / "t").training  # a training form keeps its factory's (train) mode


def test_import_trainfer_does_not_import_pydantic():
    code = "import sys, trainfer; print('pydantic' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr


# --------------------------------------------------------------------------- the property test
JUNK = st.deferred(
    lambda: st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -1, 1, 2, 2**31, 10**18]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["os:system", "subprocess:run", "trust_evil_mod:factory", "builtins:eval", "x" * 2000]),
        st.sampled_from(["x\n", "x\r", "\u2028", "'", '"', "__class__", "training", "self", "ｘ", "**{})\r#", "a.b"]),
        st.lists(JUNK, max_size=3),
        st.dictionaries(st.text(max_size=6), JUNK, max_size=3),
    )
)


def paths(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value, parents before children."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def mutate(manifest, path, kind, junk):
    """A copy of ``manifest`` with the value at ``path`` deleted, replaced, or swapped for a sibling type."""
    mutated = copy.deepcopy(manifest)
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "delete" and isinstance(parent, dict):
        del parent[last]
    elif kind == "wrap":
        parent[last] = [parent[last]]
    elif kind == "stringify":
        parent[last] = json.dumps(parent[last])
    else:
        parent[last] = junk
    return mutated


@pytest.fixture(scope="module")
def valid_bundles(tmp_path_factory):
    """A training-form and a deploy-form bundle, their manifests and the outputs they must reproduce."""
    root = tmp_path_factory.mktemp("valid")
    model = trained(classes=3)
    trainfer.save(model, root / "train", factory=factory_name(trust_net), config={"classes": 3}, labels=list("abc"),
                  preprocess={"mean": [0.5], "std": [0.25]}, example_inputs=X[:1])  # fmt: skip
    deployed = trainfer.deploy(model, X)
    trainfer.save(
        deployed, root / "deploy", factory=factory_name(trust_net), config={"classes": 3}, example_inputs=X[:1]
    )
    with torch.no_grad():
        expected = model(X)
    return {
        form: (root / form, json.loads((root / form / "manifest.json").read_text())) for form in ("train", "deploy")
    }, expected


@pytest.mark.parametrize("returned", [None, "wrapped"])
def test_an_architecture_returning_other_than_the_recorded_output_structure_is_refused(valid_bundles, returned):
    """Found by the property below: the output node edited to return None, or the tensor in a list
    (the description's digest recomputed, as an attacker would), loaded and computed something else."""
    bundles, _ = valid_bundles
    source, manifest = bundles["deploy"]
    mutated = copy.deepcopy(manifest)
    output = mutated["architecture"]["nodes"][-1]
    output["args"][0] = None if returned is None else [output["args"][0]]
    body = {key: value for key, value in mutated["architecture"].items() if key != "sha256"}
    mutated["architecture"]["sha256"] = digest(body)
    with tempfile.TemporaryDirectory() as directory:
        bundle = Path(directory) / "b"
        shutil.copytree(source, bundle)
        (bundle / "manifest.json").write_text(json.dumps(mutated))
        with pytest.raises(BundleError, match="architecture"):
            trainfer.load(bundle)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), form=st.sampled_from(["train", "deploy"]))
def test_mutated_manifests_give_a_named_bundle_error_or_a_correct_load(valid_bundles, evil_module, data, form):
    bundles, expected = valid_bundles
    source, manifest = bundles[form]
    path = data.draw(st.sampled_from(paths(manifest)), label="path")
    kind = data.draw(st.sampled_from(["delete", "replace", "replace", "wrap", "stringify"]), label="kind")
    mutated = mutate(manifest, path, kind, data.draw(JUNK, label="junk"))
    architecture = mutated.get("architecture")
    if path[0] == "architecture" and path[1:] != ("sha256",) and isinstance(architecture, dict):
        body = {key: value for key, value in architecture.items() if key != "sha256"}
        architecture["sha256"] = digest(body)  # as an attacker would: the digest is no signature
    with tempfile.TemporaryDirectory() as directory:
        bundle = Path(directory) / "b"
        shutil.copytree(source, bundle)
        (bundle / "manifest.json").write_text(json.dumps(mutated))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BundleWarning)
            try:
                loaded = trainfer.load(bundle)
            except BundleError as error:
                assert str(path[0]) in str(error) or (path[0] == "format" and "trainfer manifest" in str(error)), (
                    f"{path}: {error}"
                )
            else:
                with torch.no_grad():
                    torch.testing.assert_close(loaded.eval()(X), expected, rtol=1e-5, atol=1e-5)
    assert not evil_module.exists() and "trust_evil_mod" not in sys.modules


def _with_nan_weights(bundle: Path, name: str) -> Path:
    """``bundle`` with the weight ``name`` all NaN and the manifest's sha256 recomputed, as anyone can."""
    from safetensors.torch import load_file, save_file

    from trainfer.digest import sha256

    file = bundle / "model.safetensors"
    state = load_file(str(file))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(file))
    manifest = json.loads((bundle / "manifest.json").read_text())
    return rewrite(bundle, weights={**manifest["weights"], "sha256": sha256(file)})


@pytest.mark.parametrize("name", ["7.weight", "1.running_var"])
def test_a_bundle_whose_weights_are_nan_is_refused_at_load_naming_them(tmp_path, name):
    """Attacker round 10 F8: it loaded, served "ready", and every request was refused telling the client to
    look at its inputs. Refused at load (Predictor.load, trainfer.load, predict, serve), one line."""
    from trainfer.server.app import ServerSettings, create_app

    bundle = _with_nan_weights(save(tmp_path / "b"), name)
    kind = "buffer" if "running" in name else "parameter"
    message = f"weights in {bundle}: {kind} '{name}' holds"
    for load in (trainfer.load, trainfer.Predictor.load):
        with pytest.raises(
            BundleError, match=re.escape(message) + r" \d+ NaN or inf value\(s\) of \d+: broken weights"
        ):
            load(bundle)
    (tmp_path / "x.npy").write_bytes(b"")  # never read: the bundle is refused first
    result = CliRunner().invoke(main, ["predict", str(bundle), str(tmp_path / "x.npy")])
    assert (result.exit_code, result.output.count("\n")) == (2, 1) and message in result.output, result.output

    fatal: list[BaseException] = []
    app = create_app(ServerSettings(bundles={"b": str(bundle)}), on_fatal=fatal.append, background=False)

    async def serve():
        async with app.router.lifespan_context(app):
            return app.state.server.ready

    assert asyncio.run(serve()) is False and len(fatal) == 1 and message in str(fatal[0])
