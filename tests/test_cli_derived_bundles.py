"""A bundle the CLI writes from a bundle (``trainfer deploy BUNDLE -o OUT``) serves as its source does.

Each kind of bundle (classification with mean/std and labels, binary, regression with target
scaling, named heads, a CTC sequence model with its decoder) is deployed through the command line,
and the written bundle's Predictor must give the source bundle's predictions on the same raw inputs:
a derived bundle that lost the preprocessing, labels, task, heads or decoder answers otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from agreement import assert_results_close
from click.testing import CliRunner
from serving_models import FACTORY, trained
from torch import nn

import trainfer
from trainfer.cli import main
from trainfer.serve.bundle import read_manifest
from trainfer.testing import randomize_batchnorm

IMAGE = {"input_shape": [1, 8, 8], "mean": [0.4], "std": [0.3], "pixel_scale": 1.0}


class TwoHeads(nn.Module):
    """One trunk (conv-BN-ReLU), two named outputs: ``digit`` (4 logits) and ``size`` (one value)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.digit, self.size = nn.Linear(256, 4), nn.Linear(256, 1)

    def forward(self, x):
        features = self.trunk(x)
        return {"digit": self.digit(features), "size": self.size(features)}


def two_heads() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(TwoHeads(), seed=0).eval()


trainfer.register_model(two_heads, name="test_cli_derived_bundles:two_heads")


def _classification(path):
    labels = ["cat", "dog", "eel"]
    return trainfer.save(trained(1), path, factory=FACTORY, config={}, labels=labels, preprocess=IMAGE)


def _binary(path):
    model, config = trained(2, outputs=1, final="sigmoid"), {"outputs": 1, "final": "sigmoid"}
    return trainfer.save(
        model, path, factory=FACTORY, config=config, task="binary", labels=["no", "yes"], preprocess=IMAGE
    )


def _regression(path):
    scaling = {**IMAGE, "target_mean": [10.0, -3.0], "target_std": [2.0, 0.5]}
    model, config = trained(3, outputs=2), {"outputs": 2}
    return trainfer.save(model, path, factory=FACTORY, config=config, task="regression", preprocess=scaling)


def _heads(path):
    tasks, labels = {"digit": "classification", "size": "regression"}, {"digit": list("abcd")}
    return trainfer.save(
        two_heads(), path, factory="test_cli_derived_bundles:two_heads", heads=tasks, labels=labels, preprocess=IMAGE
    )


def _ctc(path):
    from trainfer.demo.digit_strings import preprocess_spec
    from trainfer.models import digit_string_crnn
    from trainfer.models.sequence import CTC_TOKENS

    torch.manual_seed(4)
    model = randomize_batchnorm(digit_string_crnn(width=4), seed=4).eval()
    decoder = {"kind": "ctc", "blank": 0, "beam_width": 3}
    return trainfer.save(
        model, path, task="sequence", labels=list(CTC_TOKENS), decoder=decoder, preprocess=preprocess_spec()
    )


KINDS = {"classification": _classification, "binary": _binary, "regression": _regression, "heads": _heads}
KINDS["ctc"] = _ctc


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_trainfer_deploy_of_a_bundle_predicts_what_the_bundle_predicts(tmp_path, kind):
    source = KINDS[kind](tmp_path / "source")
    out = tmp_path / "deployed"
    result = CliRunner().invoke(main, ["deploy", str(source), "-o", str(out), "--trust-factory"])
    assert result.exit_code == 0, result.output
    shape = read_manifest(source).input_shape
    raw = np.random.default_rng(0).uniform(0, 1, (5, *shape[1:])).astype(np.float32)
    expected = trainfer.Predictor.load(source, trust_factory=True).predict(raw)
    got = trainfer.Predictor.load(out).predict(raw)
    assert read_manifest(out).form == "deploy"
    assert_results_close(got, expected, atol=1e-4)


SERVED_AS = ("task", "labels", "heads", "preprocess", "decoder")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_save_like_a_bundle_carries_what_it_serves_as_in_python(tmp_path, kind):
    """``trainfer.save(deploy(load(b)), out, like=b)`` writes what ``trainfer deploy b`` writes: the bundle's
    task, labels, heads, preprocessing and decoder, so that it predicts what the bundle predicts."""
    source = KINDS[kind](tmp_path / "source")
    given = read_manifest(source)
    model = trainfer.load(source, trust_factory=True)
    deployed = trainfer.deploy(model, torch.randn(given.input_shape))
    trainfer.save(deployed, tmp_path / "like", like=source)
    written = read_manifest(tmp_path / "like")
    for field in SERVED_AS:
        assert getattr(written, field) == getattr(given, field), field
    raw = np.random.default_rng(0).uniform(0, 1, (5, *given.input_shape[1:])).astype(np.float32)
    expected = trainfer.Predictor.load(source, trust_factory=True).predict(raw)
    assert_results_close(trainfer.Predictor.load(tmp_path / "like").predict(raw), expected, atol=1e-4)


def test_trainfer_prune_refuses_a_bundle_of_several_heads_one_gate_cannot_compare(tmp_path):
    source = KINDS["heads"](tmp_path / "source")
    deployed = tmp_path / "deployed"
    assert CliRunner().invoke(main, ["deploy", str(source), "-o", str(deployed), "--trust-factory"]).exit_code == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)).astype(np.float32))
    arguments = ["prune", str(deployed), "-o", str(tmp_path / "pruned"), "--ratio", "0.25", "--data"]
    result = CliRunner().invoke(main, [*arguments, str(tmp_path / "x.npy"), "--min-agreement", "0"])
    assert result.exit_code == 2 and "compares one output tensor" in result.output
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("kind", ["classification"])
def test_trainfer_prune_of_a_bundle_keeps_what_it_serves_as(tmp_path, kind):
    source = KINDS[kind](tmp_path / "source")
    deployed, out = tmp_path / "deployed", tmp_path / "pruned"
    assert CliRunner().invoke(main, ["deploy", str(source), "-o", str(deployed), "--trust-factory"]).exit_code == 0
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)).astype(np.float32))
    arguments = ["prune", str(deployed), "-o", str(out), "--ratio", "0.25", "--data", str(tmp_path / "x.npy")]
    result = CliRunner().invoke(main, [*arguments, "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    written, given = read_manifest(out), read_manifest(source)
    for field in SERVED_AS:  # the heads with how each output kind was decided
        assert getattr(written, field) == getattr(given, field), field


def _four_labels(manifest):
    manifest["labels"] = manifest["heads"][0]["labels"] = ["cat", "dog", "eel", "fox"]  # the model has 3 classes


def _probabilities(manifest):
    manifest["heads"][0]["output_kind"] = "probabilities"  # its outputs are logits


UNSERVABLE = {
    "four labels": (_four_labels, "4 labels given, but the model outputs 3 classes"),
    "probabilities": (_probabilities, "declared output kind 'probabilities', but outputs range over"),
}


def _edited(bundle, edit):
    """``bundle`` with its manifest changed by ``edit`` (a dict -> None), as a hostile source would be."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return bundle


def _derive(tmp_path, command, source):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32))
    data = str(tmp_path / "x.npy")
    arguments = {
        "deploy": ["--trust-factory"],
        "prune": ["--ratio", "0.25", "--data", data, "--min-agreement", "0"],
        "quantize": ["--calibration", data],
    }[command]
    return CliRunner().invoke(main, [command, str(source), "-o", str(tmp_path / "out"), *arguments])


@pytest.mark.parametrize("command", ["deploy", "prune", "quantize"])
@pytest.mark.parametrize("case", sorted(UNSERVABLE))
def test_a_bundle_that_cannot_serve_derives_none(tmp_path, command, case):
    """deploy/prune/quantize of a source whose carried labels or output kind its model contradicts refuse it in
    one line (exit 2) and write nothing: the bundle they would write fails every load the same way."""
    edit, expected = UNSERVABLE[case]
    source = _classification(tmp_path / "source")
    if command != "deploy":  # prune and quantize take a deploy form
        assert CliRunner().invoke(main, ["deploy", str(source), "-o", str(tmp_path / "dep")]).exit_code == 0
        source = tmp_path / "dep"
    result = _derive(tmp_path, command, _edited(source, edit))
    assert result.exit_code == 2, result.output
    assert expected in result.output and result.output.count("error:") == 1
    assert result.output.rstrip().endswith("probe inputs: refusing to write it")  # what the command refuses
    assert not (tmp_path / "out").exists()


def test_trainfer_save_refuses_labels_for_other_classes_than_its_model_outputs_writing_nothing(tmp_path):
    """The check the derived-bundle commands make, made by ``trainfer.save`` itself: 4 labels for a 3-class model
    are refused before anything is written (no load would accept the bundle), in one line."""
    model, labels = trained(1), ["cat", "dog", "eel", "fox"]
    message = r"'.*out': 4 labels given, but the model outputs 3 classes on 8 probe inputs: refusing to write it$"
    with pytest.raises(trainfer.errors.BundleError, match=message):
        trainfer.save(model, tmp_path / "out", factory=FACTORY, config={}, labels=labels, preprocess=IMAGE)
    assert not (tmp_path / "out").exists()


def test_the_loader_refuses_labels_for_other_classes_than_its_model_outputs(tmp_path):
    """What deploy checks is what any load checks: 4 labels on a 3-class model are refused when loaded, not at
    the first prediction."""
    source = _edited(_classification(tmp_path / "source"), _four_labels)
    with pytest.raises(trainfer.errors.BundleError, match="4 labels given, but the model outputs 3 classes"):
        trainfer.Predictor.load(source, trust_factory=True)


@pytest.mark.parametrize("command", ["deploy", "prune", "quantize"])
def test_a_derived_bundle_says_why_each_output_kind_is_what_it_is_as_its_source_did(tmp_path, command):
    """The kinds carried over are the source's: the written manifest keeps its reasons ("detected: ..."),
    rather than saying that a caller declared them."""
    source = _classification(tmp_path / "source")
    if command != "deploy":
        assert CliRunner().invoke(main, ["deploy", str(source), "-o", str(tmp_path / "dep")]).exit_code == 0
        source = tmp_path / "dep"
    assert _derive(tmp_path, command, source).exit_code == 0
    decided = read_manifest(tmp_path / "out").heads[0].output_kind_decided_by
    assert decided == read_manifest(source).heads[0].output_kind_decided_by and decided.startswith("detected: ")


def test_trainfer_prune_takes_trust_factory_and_loads_the_bundle_with_it(tmp_path, monkeypatch):
    """Prune's refusal of an unregistered factory names ``--trust-factory`` (the loader's line), and prune now
    takes it (it had no such option: attacker round 12), handing it to the load."""
    from trainfer.serve import prune as prune_module

    seen, load_source = [], prune_module.load_source

    def recording(*arguments, **options):
        seen.append(options.get("trust_factory"))
        return load_source(*arguments, **options)

    monkeypatch.setattr(prune_module, "load_source", recording)
    source = _classification(tmp_path / "source")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32))
    arguments = ["prune", str(source), "--ratio", "0.25", "--data", str(tmp_path / "x.npy"), "--min-agreement", "0"]
    for out, trust in (("plain", []), ("trusted", ["--trust-factory"])):
        result = CliRunner().invoke(main, [*arguments, "-o", str(tmp_path / out), *trust])
        assert result.exit_code == 0, result.output
    assert seen == [False, True]
