"""Bundles: exact round trips, strict manifest checks, no pickle execution, atomic writes."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_models import tiny_net
from torch import nn

import trainfer
from trainfer import BundleError
from trainfer.errors import MissingFileError
from trainfer.serve.architecture import digest
from trainfer.serve.bundle import load_weights, read_manifest
from trainfer.testing import assert_close, randomize_batchnorm

FACTORY = f"{__name__}:tiny_cnn"


@trainfer.register_model
def tiny_cnn(classes: int = 3, width: int = 4) -> nn.Module:
    """The serving tests' small CNN on 1x8x8 inputs, under the keyword a bundle's config records."""
    return tiny_net(outputs=classes, width=width)


def trained(dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_cnn(**config)).to(dtype)
    return model.eval()


class Payload:
    """A pickle that, if ever unpickled, creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_reproduces_outputs(tmp_path, dtype):
    model = trained(dtype, classes=5, width=3)
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    trainfer.save(model, tmp_path / "b", factory=FACTORY, config={"classes": 5, "width": 3}, example_inputs=x)
    loaded = trainfer.load(tmp_path / "b")
    assert next(loaded.parameters()).dtype == dtype
    with trainfer.inference(model, loaded):
        assert_close(loaded(x), model(x))
        assert torch.equal(loaded(x), model(x))
    recipe = trainfer.recipe_of(loaded)
    assert recipe.factory == FACTORY and recipe.input_shape == (1, 1, 8, 8) and recipe.form == "train"


def test_manifest_records_everything(tmp_path):
    model = trained()
    spec = trainfer.PreprocessSpec(mean=[0.5], std=[0.25])
    x = torch.randn(2, 1, 8, 8)
    trainfer.save(
        model,
        tmp_path / "b",
        factory=FACTORY,
        task="classification",
        labels=list("abc"),
        preprocess=spec,
        example_inputs=x,
    )
    manifest = read_manifest(tmp_path / "b")
    assert manifest.factory == FACTORY and manifest.config == {} and manifest.form == "train"
    assert manifest.input.model_dump() == {"shape": [1, 1, 8, 8], "dtype": "float32"}
    assert manifest.preprocess.input_shape == [1, 8, 8] and manifest.preprocess.mean == [0.5]
    assert manifest.labels == ["a", "b", "c"] and manifest.task == "classification"
    assert manifest.heads[0].output_kind == "logits"
    assert "Linear" in manifest.heads[0].output_kind_decided_by
    assert manifest.versions.torch == torch.__version__
    assert manifest.output_structure.model_dump(exclude_unset=True) == {"type": "tensor"}
    import hashlib

    assert manifest.weights.sha256 == hashlib.sha256((tmp_path / "b/model.safetensors").read_bytes()).hexdigest()


def test_save_uses_the_recipe_and_leaves_model_untouched(tmp_path):
    model = trained().train()
    model[1].eval()  # mixed modes must survive
    trainfer.attach_recipe(model, trainfer.ModelRecipe(FACTORY, {"classes": 3}, (1, 1, 8, 8)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainfer.save(model, tmp_path / "b")
    assert model.training and not model[1].training and model[4].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert read_manifest(tmp_path / "b").input.shape == [1, 1, 8, 8]


def test_save_without_factory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="factory="):
        trainfer.save(tiny_cnn(), tmp_path / "b")


def test_mismatched_weights_are_listed_by_name(tmp_path):
    trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    manifest = read_manifest(tmp_path / "b").to_json()
    manifest["config"] = {"classes": 7}
    (tmp_path / "b/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"mis-shaped \(2\): 7.weight: expected \(7, 64\), got \(3, 64\)"):
        trainfer.load(tmp_path / "b")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = trained().state_dict()
    state["extra.weight"] = state.pop("7.bias")
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(BundleError) as error:
        trainfer.load(tmp_path / "ckpt.pt", factory=FACTORY)
    assert "missing keys (1): 7.bias" in str(error.value) and "unexpected keys (1): extra.weight" in str(error.value)


def test_corrupted_weights_fail_the_checksum(tmp_path):
    trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    weights = tmp_path / "b/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 expected"):
        trainfer.load(tmp_path / "b")


@pytest.mark.parametrize("name", ["nope.safetensors", "nope.pt"])
def test_a_missing_checkpoint_with_a_factory_is_a_missing_file_not_a_missing_bundle(tmp_path, name):
    with pytest.raises(MissingFileError, match=f"no checkpoint file at '{tmp_path / name}'"):
        trainfer.load(tmp_path / name, factory=FACTORY)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no trainfer bundle"):
        trainfer.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(BundleError, match="not a trainfer manifest"):
        read_manifest(tmp_path)


def test_bad_factory_is_named_when_trusted(tmp_path):
    trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    manifest = read_manifest(tmp_path / "b").to_json()
    for factory, message in [
        ("nope_module_xyz:f", "cannot import"),
        (f"{__name__}:missing", "no attribute"),
        ("no_colon", "package.module:function"),
    ]:
        manifest["factory"] = factory
        (tmp_path / "b/manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            trainfer.load(tmp_path / "b", trust_factory=True)


def test_checkpoint_pt_loads_through_weights_only(tmp_path):
    model = trained()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    loaded = trainfer.load(tmp_path / "c.pt", factory=FACTORY)
    x = torch.randn(2, 1, 8, 8)
    with trainfer.inference(model, loaded):
        assert torch.equal(loaded(x), model(x))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "payload": Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(BundleError, match="refusing to load"):
        load_weights(tmp_path / "evil.pt")
    with pytest.raises(BundleError, match="refusing to load"):
        trainfer.load(tmp_path / "evil.pt", factory=FACTORY)
    assert not marker.exists()


def test_atomic_save_keeps_previous_bundle_on_crash(tmp_path, monkeypatch):
    first = trained()
    trainfer.save(first, tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}

    import trainfer.serve.bundle_write as bundle_write

    def crash(path, data):
        with open(path, "w") as handle:
            handle.write('{"partial": ')  # a half-written manifest, then the process dies
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(bundle_write, "_write_json", crash)
    second = randomize_batchnorm(tiny_cnn(), seed=5)
    with pytest.raises(KeyboardInterrupt):
        trainfer.save(second, tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary left behind
    monkeypatch.undo()
    trainfer.load(tmp_path / "b")  # still loads


def test_save_overwrites_a_bundle_but_not_other_directories(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    other = randomize_batchnorm(tiny_cnn(), seed=3).eval()
    trainfer.save(other, tmp_path / "b", factory=FACTORY, example_inputs=x)
    loaded = trainfer.load(tmp_path / "b")
    with trainfer.inference(loaded):
        assert torch.equal(loaded(x), other(x))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos/cat.png").write_bytes(b"x")
    with pytest.raises(BundleError, match="not a trainfer bundle"):
        trainfer.save(other, tmp_path / "photos", factory=FACTORY, example_inputs=x)
    assert (tmp_path / "photos/cat.png").exists()


def _files_under(directory):
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_save_refuses_to_replace_a_bundle_holding_files_of_the_users_and_keeps_them(tmp_path):
    """M5: rewriting a bundle swapped the whole directory, deleting NOTES.txt and mydata/ the user had put there."""
    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    (bundle / "NOTES.txt").write_text("notes")
    (bundle / "mydata").mkdir()
    (bundle / "mydata/f").write_text("x")
    before = _files_under(bundle)
    refused = "refusing to overwrite the bundle '.*b': it also holds 'NOTES.txt', 'mydata', which are not files "
    with pytest.raises(BundleError, match=refused + "of a trainfer bundle and would be deleted: move them out of it"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert _files_under(bundle) == before
    for name in ("a", "c", "d"):
        (bundle / name).write_text(name)
    with pytest.raises(BundleError, match="holds 'NOTES.txt', 'a', 'c' and 2 more, which"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)


def test_a_directory_or_link_under_a_bundle_files_name_is_not_a_bundle_file(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    (bundle / "runtime.json").mkdir()
    (bundle / "runtime.json/mine").write_text("x")
    (bundle / "probes.safetensors").symlink_to(tmp_path)
    with pytest.raises(BundleError, match="holds 'probes.safetensors', 'runtime.json', which"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert (bundle / "runtime.json/mine").read_text() == "x"


def test_a_rewrite_removes_what_a_killed_write_of_a_bundle_file_left_in_it_and_nothing_else(tmp_path):
    """``trainfer compile`` killed while writing ``runtime.json`` left its temporary file (and journal) in the
    bundle, which every later ``trainfer.save`` / ``deploy -o`` over it refused as the user's file: the rewrite's
    check removes them, as proven trainfer's. A user's file of a look-alike name is still refused, and kept."""
    from test_atomic import crash_replace

    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    assert not crash_replace(bundle / "runtime.json", 3, "before", "fallback", own="file")  # killed before its rename
    assert len(list(bundle.glob(".runtime.json.trainfer-*"))) == 2  # the temporary file and its journal
    trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert sorted(path.name for path in bundle.iterdir()) == ["manifest.json", "model.safetensors"]
    (bundle / ".runtime.json.1234abcd.tmp.json").write_text("mine")
    with pytest.raises(BundleError, match=r"holds '\.runtime\.json\.1234abcd\.tmp\.json', which are not files"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert (bundle / ".runtime.json.1234abcd.tmp.json").read_text() == "mine"


def test_a_directory_made_under_a_bundle_files_name_during_a_rewrite_is_kept(tmp_path, monkeypatch):
    """Attacker: between a rewrite's listing of the bundle's own files and the swap, the user makes a directory
    under ``runtime.json``'s name. The journal recorded it (a directory was as good as a file) and the rewrite
    deleted it with the previous version: only a regular file is a bundle's, so it is kept, with that version."""
    from trainfer.serve import bundle_format, bundle_write

    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    (bundle / "runtime.json").write_text("{}")
    listings = []

    def user_makes_a_directory_after_the_listing(directory):
        listed = bundle_format.own_files(directory)
        listings.append(listed)
        if len(listings) == 2:  # the swap's listing (the first is check_replaceable's)
            (directory / "runtime.json").unlink()
            (directory / "runtime.json").mkdir()
            (directory / "runtime.json" / "mine.txt").write_text("user data")
        return listed

    monkeypatch.setattr(bundle_write, "own_files", user_makes_a_directory_after_the_listing)
    with pytest.warns(trainfer.WriteWarning, match="held 'runtime.json' besides its writer's files"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert "runtime.json" in listings[1] and sorted(p.name for p in bundle.iterdir()) == [
        "manifest.json",
        "model.safetensors",
    ]
    kept = tmp_path / ("b" + trainfer.atomic.KEPT_SUFFIX)
    assert (kept / "runtime.json" / "mine.txt").read_text() == "user data"


INT8_RECORD = {"format": "trainfer-quantized", "file": "quantized.onnx", "sha256": "0" * 64}


def test_save_replaces_a_bundle_holding_every_kind_of_bundle_file(tmp_path):
    """A bundle holding a recorded runtime and an int8 form (every name bundle_files lists) is rewritten whole."""
    from trainfer.serve.bundle_format import RETIRED_FILE, bundle_files

    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    for name in bundle_files() - {"manifest.json", "model.safetensors", RETIRED_FILE}:
        (bundle / name).write_text("stale")
    (bundle / RETIRED_FILE).write_text(json.dumps(INT8_RECORD))  # what trainfer compile renames its record to
    other = randomize_batchnorm(tiny_cnn(), seed=3).eval()
    trainfer.save(other, bundle, factory=FACTORY, example_inputs=x)
    assert sorted(path.name for path in bundle.iterdir()) == ["manifest.json", "model.safetensors"]
    loaded = trainfer.load(bundle)
    with trainfer.inference(loaded):
        assert torch.equal(loaded(x), other(x))


def test_a_retired_record_that_is_not_trainfers_is_the_users_file(tmp_path):
    """L-B2: the name quantization.json.retired alone proves nothing: a file of that name not holding trainfer's
    int8 record is refused like any other file of the user's, never deleted."""
    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    (bundle / "quantization.json.retired").write_text("x")
    before = _files_under(bundle)
    with pytest.raises(BundleError, match="holds 'quantization.json.retired', which are not files of a trainfer"):
        trainfer.save(trained(), bundle, factory=FACTORY, example_inputs=x)
    assert _files_under(bundle) == before


def test_a_file_written_into_a_bundle_while_it_is_rewritten_is_kept_with_the_previous_version(tmp_path, monkeypatch):
    """M-B1: a file written into the bundle after save's check (a logger, while the new version is staged)
    is never deleted: the previous version is kept whole beside the bundle, and a warning says where."""
    from trainfer.serve import bundle_write

    x = torch.randn(2, 1, 8, 8)
    bundle = trainfer.save(trained(), tmp_path / "b", factory=FACTORY, example_inputs=x)
    previous = _files_under(bundle)
    write_safetensors = bundle_write.write_safetensors

    def user_writes_meanwhile(state, path):
        (bundle / "late.txt").write_text("user data")
        write_safetensors(state, path)

    monkeypatch.setattr(bundle_write, "write_safetensors", user_writes_meanwhile)
    other = randomize_batchnorm(tiny_cnn(), seed=3).eval()
    kept = tmp_path / "b.previous-version-with-your-files"
    with pytest.warns(trainfer.WriteWarning, match=rf"held 'late.txt' .* kept with them in '{kept}'$"):
        trainfer.save(other, bundle, factory=FACTORY, example_inputs=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", kept.name]
    assert _files_under(kept) == {kept / "late.txt": b"user data", **{kept / p.name: v for p, v in previous.items()}}
    loaded = trainfer.load(bundle)
    with trainfer.inference(loaded):
        assert torch.equal(loaded(x), other(x))


def test_loads_on_cpu_whatever_the_save_device(tmp_path):
    model = trained()
    trainfer.save(model, tmp_path / "b", factory=FACTORY, example_inputs=torch.randn(1, 1, 8, 8))
    loaded = trainfer.load(tmp_path / "b")
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deploy_form_round_trip(tmp_path, dtype):
    from trainfer.reparam.deploy import deploy
    from trainfer.testing import batch_norm_calls

    model = trained(dtype, classes=5, width=3)
    x = torch.randn(3, 1, 8, 8, dtype=dtype)
    deployed = deploy(model, x)
    trainfer.save(deployed, tmp_path / "d", factory=FACTORY, config={"classes": 5, "width": 3}, example_inputs=x)
    assert read_manifest(tmp_path / "d").form == "deploy"
    loaded = trainfer.load(tmp_path / "d")
    assert batch_norm_calls(loaded, x) == 0 and trainfer.recipe_of(loaded).form == "deploy"
    with trainfer.inference(model, loaded):
        assert_close(loaded(x), model(x))
    assert loaded.state_dict().keys() == deployed.state_dict().keys()


@pytest.mark.parametrize("protocols", [True, False])
def test_deploy_options_are_replayed_on_load(tmp_path, protocols):
    """digits_net's blocks fold under other names with protocols=False: the bundle must rebuild that form."""
    from trainfer.models import digits_net
    from trainfer.reparam.deploy import deploy

    model = randomize_batchnorm(digits_net()).eval()
    x = torch.randn(2, 1, 8, 8)
    deployed = deploy(model, x, protocols=protocols)
    trainfer.save(deployed, tmp_path / "d")
    assert read_manifest(tmp_path / "d").to_json()["deploy_options"] == {"protocols": protocols}
    loaded = trainfer.load(tmp_path / "d")
    assert loaded.state_dict().keys() == deployed.state_dict().keys()
    with trainfer.inference(model, loaded):
        assert_close(loaded(x), model(x))


def test_deploy_form_weights_must_fit_the_rebuilt_architecture(tmp_path):
    from trainfer.reparam.deploy import deploy

    x = torch.randn(1, 1, 8, 8)
    trainfer.save(deploy(trained(), x), tmp_path / "d", factory=FACTORY, example_inputs=x)
    manifest = read_manifest(tmp_path / "d").to_json()
    last = [spec for spec in manifest["architecture"]["modules"].values() if spec["type"] == "Linear"][-1]
    classes, last["args"]["out_features"] = last["args"]["out_features"], 6
    architecture = {key: value for key, value in manifest["architecture"].items() if key != "sha256"}
    manifest["architecture"]["sha256"] = digest(architecture)  # a consistent edit (the graph runs): weights catch it
    (tmp_path / "d/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"mis-shaped .*expected \(6, \d+\), got \({classes}, \d+\)"):
        trainfer.load(tmp_path / "d")


def test_trainfer_models_need_no_factory(tmp_path):
    from trainfer.models import digits_net

    model = randomize_batchnorm(digits_net(), seed=2)
    trainfer.save(model, tmp_path / "digits", labels=[str(d) for d in range(10)])
    manifest = read_manifest(tmp_path / "digits")
    assert manifest.factory == "trainfer.models:digits_net" and manifest.input.shape == [1, 1, 8, 8]
    loaded = trainfer.load(tmp_path / "digits")
    x = torch.randn(5, 1, 8, 8)
    with trainfer.inference(model, loaded):
        assert torch.equal(loaded(x), model(x))


@trainfer.register_model
def conv_stack(
    channels: int = 3, multiplier: int = 1, kernel: int = 3, stride: int = 1, dilation: int = 1, depthwise: bool = False
) -> nn.Module:
    """Conv-BN-ReLU-Conv-BN on 1x9x9 with configurable channels, kernel, stride, dilation and groups."""
    mid = channels * multiplier
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(
            channels,
            mid,
            kernel,
            stride=stride,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            groups=channels if depthwise else 1,
        ),
        nn.BatchNorm2d(mid),
    )


@settings(max_examples=12)
@given(
    channels=st.integers(1, 5),
    multiplier=st.integers(1, 2),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    depthwise=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 100),
)
def test_round_trips_over_random_configurations(channels, multiplier, kernel, stride, dilation, depthwise, dtype, seed):
    import tempfile

    from trainfer.reparam.deploy import deploy

    config = {
        "channels": channels,
        "multiplier": multiplier,
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "depthwise": depthwise,
    }
    torch.manual_seed(seed)
    model = randomize_batchnorm(conv_stack(**config), seed=seed).to(dtype).eval()
    x = torch.randn(2, 1, 9, 9, dtype=dtype)
    deployed = deploy(model, x)
    with tempfile.TemporaryDirectory() as root:
        for name, form in (("train", model), ("deploy", deployed)):
            trainfer.save(form, f"{root}/{name}", factory=f"{__name__}:conv_stack", config=config, example_inputs=x)
            loaded = trainfer.load(f"{root}/{name}")
            assert read_manifest(f"{root}/{name}").form == name
            with trainfer.inference(form, loaded, model):
                assert torch.equal(loaded(x), form(x))  # weights restored bit for bit
                assert_close(loaded(x), model(x))  # and the deploy form still computes the model


def test_a_training_checkpoint_is_named_as_such_in_a_short_message(tmp_path):
    state = {f"model.{key}": value for key, value in trained().state_dict().items()}
    state.update({f"optimizer.state.{i}": torch.zeros(1) for i in range(40)})
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(BundleError) as error:
        trainfer.load(tmp_path / "ckpt.pt", factory=FACTORY)
    message = str(error.value)
    assert "under the prefix 'model.'" in message and "a training checkpoint?" in message
    assert "... and" in message and len(message) < 1200  # five names per kind, then a count
