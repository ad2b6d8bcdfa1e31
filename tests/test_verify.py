"""``trainfer.verify``: errors per output and dtype, tolerances, divergence localisation, no side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainfer.reparam.verify import Equivalence, verify
from trainfer.testing import randomize_batchnorm


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 1),
    )  # fmt: skip
    return randomize_batchnorm(model)


X = torch.randn(2, 3, 6, 6)


def test_identical_forms_are_equivalent_in_both_dtypes():
    model = small_net()
    eq = verify(model, copy.deepcopy(model), X)
    assert isinstance(eq, Equivalence) and eq.ok
    assert eq.max_abs_error == 0.0 and eq.max_rel_error == 0.0
    assert {o.dtype for o in eq.outputs} == {torch.float64, torch.float32}
    assert eq.inputs_checked == 6 and eq.divergence is None
    assert "ok" in str(eq)


def test_perturbed_layer_is_named_as_the_first_divergence():
    model = small_net()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[4].bias += 0.5
    eq = verify(model, broken, X)
    assert not eq.ok and eq.max_rel_error > 1e-3
    assert all(not o.ok for o in eq.outputs), "both dtypes see it"
    assert eq.divergence == "4", "the layers before the perturbed one agree; the perturbed one does not"
    assert "first divergence: module '4'" in str(eq)


def test_pairs_map_renamed_candidate_modules():
    model = small_net()
    renamed = nn.Sequential()
    for name, module in model.named_children():
        renamed.add_module(f"layer{name}", copy.deepcopy(module))
    with torch.no_grad():
        renamed.layer0.bias += 0.1
    eq = verify(model, renamed, X, pairs={f"layer{i}": str(i) for i in range(7)})
    assert not eq.ok and eq.divergence == "0"


def test_float32_weights_are_held_to_float32_tolerance_even_in_float64():
    model = small_net()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.mul_(1 + 1e-7)  # a float32-sized rounding, far above float64's 1e-9
    eq = verify(model, rounded, X)
    assert eq.ok and all(o.rtol == 1e-5 for o in eq.outputs)
    eq64 = verify(model.double(), rounded.double(), X)
    assert not eq64.ok and all(o.rtol == 1e-9 for o in eq64.outputs), "float64 weights 1e-7 apart are not equal"
    assert verify(model.double(), rounded.double(), X, rtol=1e-5).ok


def test_random_inputs_catch_a_candidate_that_only_matches_the_example():
    class MatchesOnlyExample(nn.Module):
        def __init__(self, reference, example):
            super().__init__()
            self.reference = reference
            self.register_buffer("example", example)

        def forward(self, x):
            return self.reference(x) + 0.1 * (x - self.example).abs().mean()

    model = small_net()
    candidate = MatchesOnlyExample(copy.deepcopy(model), X.clone())
    assert verify(model, candidate, X, random_inputs=0).ok
    assert not verify(model, candidate, X, random_inputs=1).ok


def test_structured_outputs_are_compared_leaf_by_leaf():
    class Heads(nn.Module):
        def __init__(self, shift=0.0, keys=("a", "b")):
            super().__init__()
            self.shift, self.keys = shift, keys

        def forward(self, x):
            return {self.keys[0]: x * 2, self.keys[1]: (x + self.shift, x.sum())}

    eq = verify(Heads(), Heads(), X)
    assert eq.ok and {o.path for o in eq.outputs} == {"output['a']", "output['b'][0]", "output['b'][1]"}
    shifted = verify(Heads(), Heads(shift=1.0), X)
    assert not shifted.ok and [o.path for o in shifted.outputs if not o.ok] == ["output['b'][0]"] * 2
    renamed = verify(Heads(), Heads(keys=("a", "c")), X)
    assert not renamed.ok and "structure differs" in str(renamed)


def test_shape_and_nan_mismatches_fail():
    class Crop(nn.Module):
        def forward(self, x):
            return x[:, :1]

    class NaNs(nn.Module):
        def forward(self, x):
            return x * float("nan")

    assert "differs from the reference's" in str(verify(nn.Identity(), Crop(), X))
    assert not verify(nn.Identity(), NaNs(), X).ok


def test_verify_leaves_models_modes_and_parameters_alone():
    model, candidate = small_net().train(), small_net().train()
    candidate[1].eval()
    state = copy.deepcopy(model.state_dict())
    verify(model, candidate, X)
    assert model.training and candidate.training and not candidate[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert next(model.parameters()).dtype == torch.float32


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="reference must be an nn.Module; got function"):
        verify(lambda x: x, nn.Identity(), X)
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        verify(nn.Identity(), nn.Identity(), [1, 2])


def test_cli_verify_exit_codes(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from trainfer.cli import main

    (tmp_path / "pair.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def a():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))\n\n"
        "def b():\n    model = a()\n    model[1].bias.data += 1\n    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    same = CliRunner().invoke(main, ["verify", "pair:a", "pair:a", "--input-shape", "1,3,6,6"])
    assert same.exit_code == 0 and "equivalence: ok" in same.output
    differ = CliRunner().invoke(main, ["verify", "pair:a", "pair:b", "--input-shape", "1,3,6,6"])
    assert differ.exit_code == 1 and "first divergence: module '1'" in differ.output
    bad = CliRunner().invoke(main, ["verify", "pair:a", "pair:b"])
    assert bad.exit_code == 2 and "--input-shape is required" in bad.output


def test_models_already_in_eval_and_dtype_run_uncopied_and_stay_clean():
    model, broken = small_net().eval(), small_net().eval()
    with torch.no_grad():
        broken[0].bias += 1
    state = copy.deepcopy(model.state_dict())
    eq = verify(model, broken, X, dtypes=(None,))
    assert not eq.ok and eq.divergence == "0"
    assert all(not m._forward_hooks for m in [*model.modules(), *broken.modules()]), "capture hooks removed"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
