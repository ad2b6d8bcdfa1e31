"""``load_source``: the one "model or bundle -> deploy form" resolver of export, compile, quantize and prune."""

from __future__ import annotations

import pytest
import torch
from serving_models import tiny_net
from torch import nn

import trainfer
from trainfer import BundleError
from trainfer.serve.source import float32_copy, load_source
from trainfer.testing import assert_close, randomize_batchnorm

UNREGISTERED = f"{__name__}:source_net"


def source_net(width: int = 4) -> nn.Module:
    """A factory no registry allows: only the caller's ``trust_factory`` lets a bundle name it."""
    return tiny_net(outputs=3, width=width)


def trained(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(source_net()).to(dtype).eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_training_form_is_deployed_and_computes_the_same(dtype):
    model = trained(dtype)
    x = torch.randn(3, 1, 8, 8, dtype=dtype)
    source = load_source(model, x)
    assert source.deployed_here and batch_norms(model) > 0 and batch_norms(source.model) == 0
    assert source.manifest.form == "deploy" and source.example.dtype == dtype and source.sample_shape == (1, 8, 8)
    with trainfer.inference(model, source.model):
        assert_close(source.model(x), model(x))
    copy = float32_copy(source.model)
    assert next(copy.parameters()).dtype == torch.float32
    assert trainfer.recipe_of(copy) == trainfer.recipe_of(source.model)


def test_a_deploy_form_is_taken_as_it_is():
    x = torch.randn(2, 1, 8, 8)
    deployed = trainfer.deploy(trained(), x)
    source = load_source(deployed, x)
    assert not source.deployed_here and source.model is deployed


def test_a_bundle_naming_an_unregistered_factory_needs_trust(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    trainfer.save(trained(), tmp_path / "b", factory=UNREGISTERED, example_inputs=x)
    with pytest.raises(BundleError, match="refusing to build factory"):
        load_source(tmp_path / "b")
    source = load_source(tmp_path / "b", trust_factory=True)  # the example: random, of the recorded shape
    assert source.deployed_here and source.sample_shape == (1, 8, 8) and source.manifest.factory == UNREGISTERED
    with trainfer.inference(source.model):
        assert_close(source.model(x), trainfer.deploy(trained(), x)(x))


def test_the_input_shape_must_come_from_somewhere():
    with pytest.raises(ValueError, match="needs the input shape"):
        load_source(trained())
    with pytest.raises(TypeError, match="floating-point tensor"):
        load_source(trained(), torch.ones(2, 1, 8, 8, dtype=torch.long))
