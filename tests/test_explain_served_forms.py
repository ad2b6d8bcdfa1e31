"""Explanations of a bundle whose served form is compiled or int8 run on its float torch model.

A bundle carrying an int8 form serves it (recorded in ``runtime.json`` or not); gradients need the float
model, so ``/explain`` and ``trainfer predict --explain`` load that one, whatever the bundle records.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from serving_models import FACTORY, trained, write_pngs

import trainfer
from trainfer import Predictor
from trainfer.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory) -> Path:
    """A bundle whose served form is its int8 one (what ``trainfer compile`` records when int8 wins)."""
    calibration = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    gate = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)  # passes any candidate, deliberately
    result = trainfer.quantize(trained(5, outputs=10), calibration, gate=gate, equalize=False, sensitivity_samples=16)
    return result.save(tmp_path_factory.mktemp("int8") / "b", factory=FACTORY, preprocess={"input_shape": [1, 8, 8]})


def test_the_server_explains_an_int8_bundle_on_its_float_model(int8_bundle):
    from trainfer.server.model import load_model

    served = load_model("b", int8_bundle, runtime=None, trust_factory=True, max_batch=4)
    assert not isinstance(served.predictor.model, torch.nn.Module)  # the int8 form serves
    sample = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    explained = served.explain(sample)
    expected = Predictor.load(int8_bundle, trust_factory=True, float_form=True).explain(sample)
    assert isinstance(Predictor.load(int8_bundle, trust_factory=True, float_form=True).model, torch.nn.Module)
    assert explained.values.abs().sum() > 0
    torch.testing.assert_close(explained.values, expected.values, rtol=1e-5, atol=1e-7)


def test_explaining_the_int8_form_names_the_keyword_that_loads_the_float_model(int8_bundle):
    served = Predictor.load(int8_bundle, trust_factory=True)
    with pytest.raises(TypeError, match=r"this predictor serves a \w+: .*Predictor.load\(path, float_form=True\)"):
        served.explain(torch.rand(1, 1, 8, 8))


def test_predict_explains_an_int8_bundle(int8_bundle, tmp_path):
    paths = [str(p) for p in write_pngs(tmp_path / "images", 2)]
    explained = tmp_path / "explained"
    result = CliRunner().invoke(main, ["predict", str(int8_bundle), *paths, "--explain", str(explained)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in explained.iterdir()) == ["000_img00000.png", "001_img00001.png"]
