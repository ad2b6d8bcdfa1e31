"""The deploy-form architecture a bundle records (trainfer.serve.architecture) and the committed fixture."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import trainfer
from trainfer.reparam.blocks import RepVGGBlock
from trainfer.reparam.blocks.activations import ACTIVATIONS
from trainfer.serve.architecture import MODULES, describe, digest, rebuild
from trainfer.testing import randomize_batchnorm

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_committed_deploy_bundle_loads_and_predicts_what_it_did_when_written():
    expected = load_file(str(FIXTURES / "digits_deploy_v2_expected.safetensors"))
    loaded = trainfer.load(FIXTURES / "digits_deploy_v2")
    assert isinstance(loaded, torch.fx.GraphModule) and trainfer.recipe_of(loaded).form == "deploy"
    with torch.no_grad():
        torch.testing.assert_close(loaded(expected["inputs"]), expected["outputs"], rtol=1e-5, atol=1e-5)


def _deployed() -> nn.Module:
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(1)))
    return trainfer.deploy(model.eval(), torch.randn(2, 1, 6, 6))


def test_a_plain_torch_deploy_form_needs_no_factory(tmp_path):
    deployed, x = _deployed(), torch.randn(3, 1, 6, 6)
    trainfer.save(deployed, tmp_path / "b", example_inputs=x)
    loaded = trainfer.load(tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x), rtol=1e-6, atol=1e-6)


def _edited(description: dict, edit) -> dict:
    body = {key: value for key, value in json.loads(json.dumps(description)).items() if key != "sha256"}
    edit(body)
    return {**body, "sha256": digest(body)}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["modules"]["fused"].update(type="Evil"), r"'Evil' is not one of the allowed module types"),
        (lambda d: d["nodes"][1].update(op="call_function", target="os.system"), r"'os.system' is not one of"),
        (lambda d: d["nodes"][1].update(op="call_method", target="__reduce__"), r"'__reduce__' is not one of"),
        (lambda d: d["modules"]["fused"]["args"].update(evil=1), r"\['evil'\] are not arguments of Conv2d"),
        (lambda d: d["nodes"][1]["args"].append({"node": "later"}), r"unknown or invalid tagged value"),
        (lambda d: d["nodes"][0].update(target="x; import os"), r"expected a plain identifier"),
        (lambda d: d["nodes"][1]["kwargs"].update({"x=1);print(1);(0": 1}), r"expected a plain identifier"),
    ],
)
def test_rebuild_refuses_what_is_not_allowed(edit, message):
    description = describe(_deployed())
    with pytest.raises(trainfer.BundleError, match=message):
        rebuild(_edited(description, edit), "test", [2, 1, 6, 6])


def test_an_edited_description_without_its_digest_is_refused():
    description = describe(_deployed())
    description["modules"]["fused"]["args"]["out_channels"] = 8
    with pytest.raises(trainfer.BundleError, match="does not match its sha256"):
        rebuild(description, "test", [2, 1, 6, 6])


class _Leaf(nn.Module):
    def forward(self, x):
        return x * 2


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, _Leaf) or super().is_leaf_module(module, name)


def test_a_module_type_off_the_allow_list_is_named():
    root = nn.Sequential(nn.Conv2d(1, 2, 1), _Leaf())
    gm = torch.fx.GraphModule(root, _LeafTracer().trace(root))
    with pytest.raises(trainfer.BundleError, match=r"module '1' is a .*_Leaf, not one of the allowed types"):
        describe(gm)


def test_a_block_level_deploy_form_is_rebuilt_by_its_factory(tmp_path):
    model = trainfer.models.reparameterize(randomize_batchnorm(trainfer.models.digits_net(width=4)).eval())
    trainfer.save(model, tmp_path / "b")
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["architecture"] is None and manifest["config"]["deploy"] is True
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(trainfer.load(tmp_path / "b").eval()(x), model(x))


def test_act_layer_takes_a_name_and_an_unknown_name_lists_the_known_ones():
    assert isinstance(RepVGGBlock(2, 2, act_layer="silu").act, nn.SiLU)
    assert isinstance(RepVGGBlock(2, 2, act_layer=nn.GELU).act, nn.GELU)
    with pytest.raises(trainfer.InputError, match=r"unknown act_layer 'swish'.*'hardswish'"):
        RepVGGBlock(2, 2, act_layer="swish")
    recipe = trainfer.recipe_of(trainfer.models.repvgg_a0(num_classes=2, act_layer=nn.Hardswish))
    assert recipe.config["act_layer"] == "hardswish" and ACTIVATIONS["hardswish"] is nn.Hardswish


def test_a_recipe_is_validated_and_shares_nothing_with_its_caller():
    config = {"width": [4]}
    recipe = trainfer.ModelRecipe("pkg.mod:net", config, [1, 3, 8, 8])
    config["width"].append(5)
    assert recipe.config == {"width": [4]} and recipe.input_shape == (1, 3, 8, 8)
    with pytest.raises(trainfer.InputError, match="JSON values only"):
        trainfer.ModelRecipe("pkg.mod:net", {"act_layer": nn.ReLU})
    with pytest.raises(trainfer.InputError, match="form must be one of"):
        trainfer.ModelRecipe("pkg.mod:net", form="fused")
    model = trainfer.attach_recipe(nn.Linear(1, 1), recipe)
    assert trainfer.recipe_of(model) is recipe and trainfer.recipe_of(nn.Linear(1, 1)) is None


class _SequentialLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, module, name):
        return isinstance(module, nn.Sequential) and name != "" or super().is_leaf_module(module, name)


def _with_a_sequential_call() -> torch.fx.GraphModule:
    root = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(3, 2, 1)), nn.Flatten(1)).eval()
    return torch.fx.GraphModule(root, _SequentialLeafTracer().trace(root))


def test_a_graph_calling_a_sequential_is_rebuilt_with_its_children():
    gm, x = _with_a_sequential_call(), torch.randn(2, 1, 5, 5)
    description = describe(gm)
    assert description["modules"]["1"]["type"] == "Sequential"
    rebuilt = rebuild(description, "test", [2, 1, 5, 5])
    rebuilt.load_state_dict(gm.state_dict(), strict=True, assign=True)
    assert isinstance(rebuilt.get_submodule("1"), nn.Sequential)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), gm(x), rtol=0, atol=0)


def test_a_sequential_child_name_with_a_dot_is_refused():
    description = describe(_with_a_sequential_call())
    edited = _edited(description, lambda d: d["modules"]["1"]["children"].update({"a.b": {"type": "ReLU", "args": {}}}))
    with pytest.raises(trainfer.BundleError, match=r"expected a plain identifier.*'a.b'"):
        rebuild(edited, "test", [2, 1, 5, 5])


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"Sequential"}))
def test_the_recorded_constructor_arguments_are_torchs_own(name):
    """``MODULES`` lists each type's constructor arguments by hand: a torch that adds or renames one fails here."""
    cls, recorded = MODULES[name]
    parameters = inspect.signature(cls.__init__).parameters
    named = [p for p in parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    expected = [p.name for p in named if p.name not in ("self", "device", "dtype")]
    assert list(recorded) == expected
    assert all(hasattr(cls(**_small_arguments(name)), arg) or arg == "bias" for arg in recorded)


def _small_arguments(name: str) -> dict:
    """Constructor arguments that build one ``name`` (the rest default)."""
    required = {
        "in_channels": 2, "out_channels": 2, "kernel_size": 1, "in_features": 2, "out_features": 2, "num_features": 2,
        "normalized_shape": [2], "num_groups": 1, "num_channels": 2, "output_size": 1,
    }  # fmt: skip
    parameters = inspect.signature(MODULES[name][0].__init__).parameters
    return {key: value for key, value in required.items() if key in parameters}
