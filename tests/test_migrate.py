"""Format-1 deploy-form bundles rewritten as current ones (trainfer.serve.migrate, ``trainfer migrate``).

The fixture tests/fixtures/digits_deploy_v1 was written by the trainfer of format_version 1
(tests/fixtures/make_digits_deploy_v1_bundle.py), its expected outputs by that trainfer's loader.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from time_limit import time_limit

import trainfer
from trainfer.cli import main
from trainfer.errors import BundleError
from trainfer.serve import migrate as migration

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def old(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "digits_deploy_v1", tmp_path / "old"))


def _files(bundle: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(bundle.iterdir())}


def _edit_manifest(bundle: Path, **fields) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def test_a_format_1_deploy_bundle_is_refused_with_the_way_to_migrate_it(old):
    with pytest.raises(BundleError, match=r"format_version 1.*`trainfer migrate OLD NEW`"):
        trainfer.load(old)


def test_the_migrated_bundle_computes_what_the_old_loader_computed(old, tmp_path):
    before = _files(old)
    expected = load_file(str(FIXTURES / "digits_deploy_v1_expected.safetensors"))
    new = migration.migrate(old, tmp_path / "new")
    assert _files(old) == before  # the source is not touched
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["architecture"]["kind"] == "fx-graph"
    assert manifest["versions"]["migrated_from_trainfer"] == "0.1.0"
    assert manifest["labels"] == [str(d) for d in range(10)] and manifest["factory"] == "trainfer.models:digits_net"
    loaded = trainfer.load(new)
    assert isinstance(loaded, torch.fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(loaded(expected["inputs"]), expected["outputs"], rtol=1e-5, atol=1e-5)
    assert [r.label for r in trainfer.Predictor.load(new).predict(expected["inputs"])] == [
        str(int(i)) for i in expected["outputs"].argmax(1)
    ]


def test_a_bundle_migrates_in_place_named_by_its_manifest(old):
    migration.migrate(old / "manifest.json", old)
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 2
    assert isinstance(trainfer.load(old), torch.fx.GraphModule)


def test_a_current_bundle_has_nothing_to_migrate(tmp_path):
    with pytest.raises(BundleError, match=r"format_version 2, form 'deploy'\) loads as it is: nothing to migrate"):
        migration.migrate(FIXTURES / "digits_deploy_v2", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_weights_that_do_not_fit_the_replayed_fold_write_nothing(old, tmp_path):
    _edit_manifest(old, config={"num_classes": 10, "width": 5})
    with pytest.raises(BundleError, match=r"mis-shaped .*another graph than the trainfer 0.1.0 that wrote"):
        migration.migrate(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_factory_that_is_not_allowed_is_neither_imported_nor_written(old, tmp_path):
    _edit_manifest(old, factory="trainfer_nowhere.evil:build")
    with pytest.raises(BundleError, match=r"refusing to build factory 'trainfer_nowhere.evil:build'"):
        migration.migrate(old, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_migrated_bundle_that_computes_otherwise_does_not_replace_the_target(old, tmp_path, monkeypatch):
    target = trainfer.save(torch.nn.Linear(2, 2), tmp_path / "target", factory="torch.nn:Linear")
    before = _files(target)

    def load_wrong(path):
        model = trainfer.load(path)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return model

    monkeypatch.setattr(migration, "load", load_wrong)
    with pytest.raises(BundleError, match=r"does not compute what the replayed fold does; nothing was written"):
        migration.migrate(old, target)
    assert _files(target) == before


def test_the_command_migrates_and_refuses_in_one_line(old, tmp_path):
    runner = CliRunner()
    done = runner.invoke(main, ["migrate", str(old), str(tmp_path / "new")])
    assert done.exit_code == 0, done.output
    assert "records its architecture" in done.output
    again = runner.invoke(main, ["migrate", str(tmp_path / "new"), str(tmp_path / "newer")])
    assert again.exit_code == 2
    assert again.output.strip().count("\n") == 0 and "nothing to migrate" in again.output


def test_a_recorded_shape_too_costly_to_replay_is_refused_before_any_real_computation(old, tmp_path, monkeypatch):
    """A hostile manifest records a huge input (within the schema's 2**24 elements a sample): the replay's cost
    is measured on the meta device and refused in one line, with nothing computed on real tensors (round 8: the
    replay reached 10.9 GB before). A legitimate shape measures well under the bounds."""
    manifest = json.loads((old / "manifest.json").read_text())
    preprocess = {**manifest["preprocess"], "input_shape": [1, 4096, 4096]}
    _edit_manifest(old, input={**manifest["input"], "shape": [1, 1, 4096, 4096]}, preprocess=preprocess)
    real_runs = []
    monkeypatch.setattr(migration, "deploy", lambda *args, **kwargs: real_runs.append(args))
    with (
        time_limit(60),
        pytest.raises(
            BundleError,
            match=r"replaying the fold on 4 samples of shape \[1, 4096, 4096\] "
            r"would compute over 268,435,456 tensor elements: expected the input shape",
        ),
    ):
        migration.migrate(old, tmp_path / "new")
    assert real_runs == [] and not (tmp_path / "new").exists()

    elements, flops = migration._check_replay_cost(
        trainfer.models.digits_net().eval(), [4, 1, 8, 8], torch.float32, "digits"
    )  # the shape the fixture was deployed for: measured (the meta device runs it), far within the bounds
    assert 0 < elements < migration.MAX_REPLAY_ELEMENTS // 100 and 0 < flops < migration.MAX_REPLAY_FLOPS // 1000
