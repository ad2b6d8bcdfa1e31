"""Every model: train form in eval() vs reparameterized form, architecture figures, recorded config."""

import copy
import json

import pytest
import torch
from torch import nn

import trainfer
from trainfer import models
from trainfer.bench import count_macs, count_parameters
from trainfer.blocks import ReparamBlock
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm

FACTORIES = [models.repvgg_a0, models.repvgg_a1, models.repvgg_a2, models.repvgg_b0, models.mobileone_s0]


def _blocks(model: nn.Module) -> int:
    return sum(isinstance(m, ReparamBlock) for m in model.modules())


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_model_reparameterizes_exactly_in_float64_and_float32(factory):
    torch.manual_seed(0)
    model = randomize_batchnorm(factory(num_classes=7)).eval()
    model32, model64 = model, copy.deepcopy(model).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    references = model64(x), model32(x.float())
    assert models.reparameterize(model64) is model64
    models.reparameterize(model32)
    assert_close(model64(x), references[0])
    assert_close(model32(x.float()), references[1])
    counts = count_aten_ops(model32, x.float())
    assert counts["convolution"] == _blocks(model32) and batch_norm_calls(model32, x.float()) == 0


PAPER_FIGURES = [  # train-form parameters, deploy-form parameters, deploy-form GMACs at 224x224
    (models.repvgg_a0, 9.11e6, 8.31e6, 1.36),
    (models.repvgg_a1, 14.09e6, 12.79e6, 2.36),
    (models.repvgg_a2, 28.21e6, 25.50e6, 5.12),
    (models.repvgg_b0, 15.82e6, 14.34e6, 3.06),
    (models.mobileone_s0, 5.29e6, 2.08e6, 0.275),
]


@pytest.mark.parametrize(
    ("factory", "train_params", "deploy_params", "deploy_gmacs"),
    PAPER_FIGURES,
    ids=[row[0].__name__ for row in PAPER_FIGURES],
)
def test_architecture_matches_the_papers(factory, train_params, deploy_params, deploy_gmacs):
    """Parameters in both forms (RepVGG Table 2; MobileOne-S0: 2.1 M, 275 M MACs, Table 7)."""
    model = factory().eval()
    assert count_parameters(model) == pytest.approx(train_params, rel=2e-3)
    models.reparameterize(model)
    assert count_parameters(model) == pytest.approx(deploy_params, rel=2e-3)
    assert count_macs(model, torch.zeros(1, 3, 224, 224)) / 1e9 == pytest.approx(deploy_gmacs, rel=1e-2)


def test_recorded_config_rebuilds_the_model_in_either_form():
    model = randomize_batchnorm(models.repvgg_a0(num_classes=5)).eval()
    recipe = trainfer.recipe_of(model)
    assert recipe == trainfer.ModelRecipe("trainfer.models:repvgg_a0", {"num_classes": 5}, (1, 3, 224, 224))
    models.reparameterize(model)
    deployed = trainfer.recipe_of(model)
    assert json.loads(json.dumps(deployed.to_dict()))["config"] == {"num_classes": 5, "deploy": True}
    assert recipe.config == {"num_classes": 5}  # a new recipe: the old one is not mutated
    factory = getattr(models, deployed.factory.split(":")[1])
    rebuilt = factory(**deployed.config).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))
    assert trainfer.recipe_of(models.digits_net()).input_shape == (1, 1, 8, 8)
    assert trainfer.recipe_of(models.mobileone_s0()).factory == "trainfer.models:mobileone_s0"


def test_digits_net_has_two_paths_and_folds_to_one_conv_per_block():
    torch.manual_seed(0)
    model = randomize_batchnorm(models.digits_net(), seed=3)
    x = torch.randn(6, 1, 8, 8)
    outputs = model.train()(x)
    assert set(outputs) == {"logits", "aux_logits"}
    assert outputs["logits"].shape == outputs["aux_logits"].shape == (6, 10)
    model64 = copy.deepcopy(model).double().eval()
    reference = model64(x.double())
    assert isinstance(reference, torch.Tensor) and reference.shape == (6, 10)
    eval_ops = count_aten_ops(model64, x.double())
    assert eval_ops["addmm"] == 1  # the auxiliary linear head does not run in eval
    models.reparameterize(model64)
    assert_close(model64(x.double()), reference)
    assert count_aten_ops(model64, x.double())["convolution"] == _blocks(model64) == 4
    assert torch.equal(model64(x.double()), model64(x.double()))  # dropout is off in eval


def test_mobileone_squeeze_excitation_and_deploy_flag():
    model = models.MobileOne((1, 1, 2, 1), (0.25, 0.25, 0.25, 0.25), num_classes=3, num_conv_branches=2, use_se=True)
    se_blocks = [m for m in model.modules() if isinstance(m, ReparamBlock) and not isinstance(m.se, nn.Identity)]
    assert len(se_blocks) == 2 * 1 + 2 * 1  # half of stage 3, all of stage 4; dw and pw unit each
    randomize_batchnorm(model).eval()
    x = torch.randn(1, 3, 32, 32)
    reference = model(x)
    models.reparameterize(model)
    assert_close(model(x), reference)
    deployed = models.MobileOne(
        (1, 1, 2, 1), (0.25, 0.25, 0.25, 0.25), num_classes=3, num_conv_branches=2, use_se=True, deploy=True
    ).eval()
    deployed.load_state_dict(model.state_dict())
    assert torch.equal(deployed(x), model(x))
