"""The public contract of shared/ARCHITECTURE.md, used the way it is written there, on one small model.

Users' scripts and acceptance checks call exactly these names; the redesign moved every module under
them, so this test walks the whole contract in order: mode safety, two forward paths, blocks and
models, deployment, bundles and prediction, registration, errors, inspection, and the command line.
"""

import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import trainfer
from trainfer.blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, RepVGGBlock
from trainfer.cli import main
from trainfer.testing import randomize_batchnorm


class Net(trainfer.DualModule):
    """Two forward paths: the training one adds an auxiliary term that inference skips."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(RepVGGBlock(1, 4), ACBlock(4, 4), nn.Dropout(0.1))
        self.aux = trainfer.train_only(nn.Conv2d(4, 4, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward_train(self, x):
        features = self.features(x)
        return self.head(features + self.aux(features))

    def forward_infer(self, x):
        return self.head(self.features(x))


@trainfer.register_model
def contract_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(Net())


def test_the_public_contract_works_as_written(tmp_path):
    model, x = contract_net(), torch.randn(4, 1, 8, 8)

    # mode safety
    with trainfer.inference(model):
        assert not model.training and torch.is_inference_mode_enabled()
    assert model.training and model.features[0].training  # every submodule's own mode is back
    with trainfer.training(model.eval()):
        assert model.training
    assert not model.training
    model.train()
    with trainfer.guard(model, strict=False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)  # a forward without gradients while Dropout and BatchNorm train
    assert any(issubclass(w.category, trainfer.ModeWarning) for w in caught)
    assert any(f.kind == "mode-dependent" for f in trainfer.audit(model, example_inputs=x).findings)

    # blocks and models
    for block in (RepVGGBlock(4, 4), ACBlock(4, 4), DiverseBranchBlock(4, 4), MobileOneBlock(4, 4)):
        block = randomize_batchnorm(block).eval()
        y = torch.randn(2, 4, 7, 7)
        before = block(y)
        block.reparameterize()
        torch.testing.assert_close(block(y), before, rtol=1e-4, atol=1e-5)
    assert trainfer.models.repvgg_a0(num_classes=10).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert callable(trainfer.models.mobileone_s0) and callable(trainfer.models.digits_net)

    # deployment: a new module, the input untouched, proved equal; verify reports the errors
    model.eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    deployed = trainfer.deploy(model, x)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    equivalence = trainfer.verify(model, deployed, x)
    assert equivalence.ok and equivalence.max_rel_error <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert issubclass(trainfer.EquivalenceError, trainfer.TrainferError)

    # bundles and prediction: the registered factory is allowed, the deploy form records its graph
    factory = f"{contract_net.__module__}:contract_net"  # the name register_model lists it under
    trainfer.save(model, tmp_path / "train", factory=factory, labels=["a", "b", "c"], example_inputs=x)
    trainfer.save(deployed, tmp_path / "deploy", labels=["a", "b", "c"], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(trainfer.load(tmp_path / "deploy")(x), deployed(x))
    predictor = trainfer.Predictor.load(tmp_path / "deploy")
    assert [len(r.top_k) for r in predictor.predict(x, top_k=3)] == [3] * 4
    ensemble = trainfer.Predictor.ensemble([predictor, trainfer.Predictor.load(tmp_path / "train")])
    assert isinstance(ensemble, trainfer.Ensemble) and len(ensemble.predict(x)) == 4

    # errors and inspection
    with pytest.raises(trainfer.TrainferError):
        trainfer.load(tmp_path / "nowhere")
    records = trainfer.inspect(model, x, modes=("train", "eval"))
    assert len(records.records) > 0


def test_explain_of_the_contract_works_as_written():
    """``predictor.explain`` (needs the ``explain`` extra: skipped alone, not the rest of the contract)."""
    pytest.importorskip("captum")
    model, x = contract_net().eval(), torch.randn(4, 1, 8, 8)
    predictor = trainfer.Predictor(trainfer.deploy(model, x), task="classification", labels=["a", "b", "c"])
    attributions = predictor.explain(x[:2], method="integrated_gradients")
    assert attributions.values.shape == (2, 1, 8, 8) and bool(attributions.values.abs().sum() > 0)


@pytest.mark.parametrize(
    "command", ["demo", "deploy", "verify", "bench", "audit", "inspect", "predict", "export", "serve"]
)
def test_every_contract_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and result.output.startswith("Usage: "), result.output
