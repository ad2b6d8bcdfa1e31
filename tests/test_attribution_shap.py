"""SHAP and LIME in trainfer's explanations: each method's defining property, masks, baselines, records."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from trainfer.analysis.attribution import METHODS, attribute, feature_mask
from trainfer.testing import randomize_batchnorm


def mlp(features: int, classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, classes)).double()


def relu_conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 64, 4)
    )
    return randomize_batchnorm(model).double()


def per_feature(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N, features)``: each feature's attribution, read at the first element carrying its id."""
    flat_mask = mask.reshape(-1)
    first = torch.stack([(flat_mask == g).nonzero()[0, 0] for g in flat_mask.unique()])
    per = values.reshape(len(values), -1)[:, first]
    grouped = values.reshape(len(values), -1)
    for k, g in enumerate(flat_mask.unique()):  # every element of a feature carries the same value
        assert torch.allclose(grouped[:, flat_mask == g], per[:, k : k + 1].expand(-1, int((flat_mask == g).sum())))
    return per


def test_feature_masks_are_patches_for_images_and_columns_for_tables():
    image = feature_mask(torch.zeros(2, 3, 8, 8))
    assert image.shape == (1, 3, 8, 8) and image.unique().numel() == 16
    assert torch.equal(image[0, 0, :2, :2], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(image[0, 0], image[0, 2])  # a patch spans the channels
    assert feature_mask(torch.zeros(2, 8, 8), patch=4).unique().numel() == 4
    assert torch.equal(feature_mask(torch.zeros(5, 6)), torch.arange(6)[None])


def test_kernel_shap_is_efficient_on_table_columns():
    """Per column, KernelSHAP's values sum to f(x) - f(baseline) (Captum weights the full coalitions 1e6)."""
    model = mlp(4, 3)
    x = torch.randn(3, 4, dtype=torch.float64)
    baseline = torch.randn(1, 4, dtype=torch.float64)
    result = attribute(model, x, "kernel_shap", n_samples=64, baselines=baseline)
    with torch.no_grad():
        rows = torch.arange(3)
        gap = model(x)[rows, result.target] - model(baseline.expand(3, 4))[rows, result.target]
    sums = per_feature(result.values, result.details["feature_mask"]).sum(dim=1)
    torch.testing.assert_close(sums, gap, rtol=0, atol=1e-4 * float(gap.abs().max()))


def test_kernel_shap_is_efficient_on_image_patches():
    model = relu_conv_net()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    result = attribute(model, x, "kernel_shap", n_samples=120, patch=4)
    with torch.no_grad():
        model.eval()
        rows = torch.arange(2)
        gap = model(x)[rows, result.target] - model(torch.zeros_like(x))[rows, result.target]
    sums = per_feature(result.values, result.details["feature_mask"]).sum(dim=1)
    torch.testing.assert_close(sums, gap, rtol=0, atol=1e-4 * float(gap.abs().max()))


def test_kernel_shap_of_a_linear_model_is_weight_times_input_minus_baseline():
    model = nn.Linear(5, 2).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    result = attribute(model, x, "kernel_shap", target=1, n_samples=100)
    torch.testing.assert_close(result.values, model.weight[1].detach() * x, rtol=0, atol=1e-4)


def test_lime_records_its_surrogate_fit():
    """A linear f is linear in the coalition: the surrogate fits it (R^2 near 1) with coefficients w * x."""
    model = nn.Linear(4, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, -0.5, 2.0, 1.0]], dtype=torch.float64)
    result = attribute(model, x, "lime", target=0, n_samples=300)
    assert len(result.details["surrogate_r2"]) == 2
    assert all(0.98 < r2 <= 1.0 for r2 in result.details["surrogate_r2"])
    torch.testing.assert_close(result.values, model.weight[0].detach() * x, rtol=0, atol=0.1)
    nonlinear = attribute(mlp(4, 3), x, "lime", n_samples=50)
    assert all(r2 <= 1.0 for r2 in nonlinear.details["surrogate_r2"])


def test_gradient_shap_of_a_linear_model_sums_to_the_output_gap():
    model = nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    references = torch.randn(5, 6, dtype=torch.float64)
    result = attribute(model, x, "gradient_shap", target=2, n_samples=40, baselines=references[:1])
    with torch.no_grad():
        gap = model(x)[:, 2] - model(references[:1])[:, 2]
    torch.testing.assert_close(result.values.sum(dim=1), gap, rtol=1e-9, atol=1e-9)
    spread = attribute(model, x, "gradient_shap", target=2, baselines=references)  # a reference batch
    assert spread.values.shape == x.shape


def test_deeplift_shap_sums_to_the_gap_of_the_raw_outputs_against_the_mean_baseline():
    model = relu_conv_net()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    references = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    result = attribute(model, x, "deeplift_shap", target=1, baselines=references)
    with torch.no_grad():
        model.eval()
        gap = model(x)[:, 1] - model(references)[:, 1].mean()
    torch.testing.assert_close(result.values.sum(dim=(1, 2, 3)), gap, rtol=1e-6, atol=1e-9)
    zero = attribute(model, x, "deeplift_shap", target=1)  # default: the zero baseline (twice)
    with torch.no_grad():
        zero_gap = model(x)[:, 1] - model(torch.zeros_like(x[:1]))[:, 1]
    torch.testing.assert_close(zero.values.sum(dim=(1, 2, 3)), zero_gap, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["kernel_shap", "lime", "gradient_shap", "deeplift_shap"])
def test_new_methods_restore_modes_and_give_the_input_shape(method):
    assert method in METHODS
    model = relu_conv_net()
    model.train()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    result = attribute(model, x, method, n_samples=18) if method != "deeplift_shap" else attribute(model, x, method)
    assert result.values.shape == x.shape and result.method == method
    assert all(m.training for m in model.modules()) and torch.is_grad_enabled()


def test_deeplift_shap_runs_on_a_copy_and_refuses_a_model_that_cannot_be_copied():
    """Its hooks never reach the model other threads run (tests/test_explain_threads.py checks the answers)."""
    model = relu_conv_net()
    registered = []
    model.register_forward_hook(lambda *args: registered.append(len(model._forward_hooks)))
    attribute(model, torch.randn(2, 1, 8, 8, dtype=torch.float64), "deeplift_shap")
    assert set(registered) == {1}  # the model's own hook, alone: DeepLIFT's were on the copy
    model.lock = threading.Lock()
    said = r"deeplift_shap hooks the modules .* runs on a copy of it .* copy.deepcopy of this Sequential fails: cannot"
    with pytest.raises(TypeError, match=said):
        attribute(model, torch.randn(2, 1, 8, 8, dtype=torch.float64), "deeplift_shap")


# -- GradientSHAP from torch's generator (Captum drew from NumPy's global one) ---------------------------


def test_gradient_shap_is_repeated_by_torch_manual_seed_alone_and_leaves_numpy_alone():
    """Captum drew the baselines and path points with ``np.random``: ``torch.manual_seed`` did not repeat an
    explanation, and every call moved NumPy's global state, which other threads share."""
    model = mlp(6, 3)
    x = torch.randn(3, 6, dtype=torch.float64)
    references = torch.randn(5, 6, dtype=torch.float64)
    before = np.random.get_state()
    found = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)
        state = np.random.get_state()
        torch.manual_seed(7)
        found.append(attribute(model, x, "gradient_shap", n_samples=9, stdevs=0.2, baselines=references).values)
        assert_same_state(np.random.get_state(), state)
    assert torch.equal(found[0], found[1])
    torch.manual_seed(8)
    assert not torch.equal(found[0], attribute(model, x, "gradient_shap", baselines=references, stdevs=0.2).values)
    np.random.set_state(before)


def assert_same_state(got: tuple, expected: tuple) -> None:
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


@pytest.mark.parametrize(("classes", "stdevs"), [(3, 0.0), (3, 0.3), (1, 0.3)])
def test_gradient_shap_is_captums_for_the_same_draws(monkeypatch, classes, stdevs):
    """Captum's GradientShap, handed trainfer's draws in place of NumPy's and torch's (its baseline rows,
    its path points, its noise), gives the same attributions."""
    from captum.attr import GradientShap

    from trainfer.analysis import attribution_gradient_shap as ours

    model = mlp(6, classes)
    forward = model if classes > 1 else (lambda rows: model(rows)[:, 0])
    x = torch.randn(4, 6, dtype=torch.float64)
    references = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2]) if classes > 1 else None
    torch.manual_seed(1)
    draws = ours.draws(x, len(references), 7, stdevs)
    mine = ours.gradient_shap_of(forward, x, target, references, draws)

    noise = draws.noise if draws.noise is not None else torch.zeros(28, 6, dtype=torch.float64)
    monkeypatch.setattr(np.random, "choice", lambda count, size: draws.baselines.numpy())
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: draws.points.numpy())
    monkeypatch.setattr(torch, "normal", lambda mean, std: noise)
    captums = GradientShap(forward).attribute(x, baselines=references, n_samples=7, stdevs=stdevs, target=target)
    torch.testing.assert_close(mine, captums, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("stdevs", [0.0, 0.3])
def test_gradient_shap_runs_its_rows_in_chunks_with_the_values_of_one_batch(stdevs):
    """All ``n_samples`` draws of a batch went through the model at once (3.5 GB for one 3 x 128 x 128 image
    at 400 draws): they now go in chunks of whole draws of at most GRADIENT_SHAP_ROWS rows, the same
    draws giving the same values."""
    from trainfer.analysis import attribution_gradient_shap as ours

    model = CountingForward(mlp(6, 3))
    x = torch.randn(3, 6, dtype=torch.float64)
    references = torch.randn(5, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    torch.manual_seed(2)
    draws = ours.draws(x, len(references), 50, stdevs)
    at_once = ours.gradient_shap_of(model, x, target, references, draws, rows_at_once=len(x) * 50)
    assert model.rows == [150]
    model.rows.clear()
    chunked = ours.gradient_shap_of(model, x, target, references, draws)
    assert max(model.rows) <= max(len(x), ours.GRADIENT_SHAP_ROWS) and sum(model.rows) == 150
    torch.testing.assert_close(chunked, at_once, rtol=1e-12, atol=1e-15)
    model.rows.clear()
    torch.manual_seed(2)
    assert torch.equal(
        attribute(model, x, "gradient_shap", target=target, n_samples=50, baselines=references, stdevs=stdevs).values,
        chunked,
    )
    assert max(model.rows) <= ours.GRADIENT_SHAP_ROWS


@pytest.mark.parametrize("references", [1, 3])
def test_gradient_shap_is_complete_in_expectation(references):
    """``E[(x - b) . grad f(b + a (x - b))]`` over ``a ~ U(0, 1)`` is ``f(x) - f(b)``, and over the reference
    batch ``f(x) - mean_b f(b)``: 4000 draws of a nonlinear model come within 5 % of the largest gap (1.4 %
    and 2 % at the seeds 0 to 5)."""
    model = mlp(5, 3)
    generator = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(3, 5, dtype=torch.float64, generator=generator)
    baselines = torch.randn(3, 5, dtype=torch.float64, generator=generator)[:references]
    torch.manual_seed(0)
    result = attribute(model, x, "gradient_shap", target=1, n_samples=4000, baselines=baselines)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(baselines)[:, 1].mean()
    torch.testing.assert_close(result.values.sum(dim=1), gap, rtol=0, atol=0.05 * float(gap.abs().max()))


class CountingForward(nn.Module):
    """``model``, counting its forwards and the rows each took."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("method", ["kernel_shap", "lime", "occlusion"])
def test_perturbed_copies_share_forwards_by_default_with_the_values_of_one_copy_per_forward(method):
    """By default up to 64 perturbed copies of an example run per forward (Captum's default is one):
    the same copies, drawn in the same order, so the values are those of one copy per forward."""
    model = CountingForward(relu_conv_net())
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    budget = {} if method == "occlusion" else {"n_samples": 130}
    results = []
    for options in ({"perturbations_per_eval": 1}, {}):
        model.rows.clear()
        torch.manual_seed(0)
        results.append(attribute(model, x, method, **budget, **options).values)
        if options:
            assert max(model.rows) == 1 and len(model.rows) > 60
        else:
            assert max(model.rows) == 64 and len(model.rows) < 10
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-12)


def test_the_default_copies_per_forward_shrink_with_the_samples_size():
    from trainfer.analysis.attribution_shap import PERTURBED_ELEMENTS_AT_ONCE, perturbations_at_once

    assert perturbations_at_once(torch.zeros(1, 1, 8, 8)) == 64
    assert perturbations_at_once(torch.zeros(1, 3, 224, 224)) == PERTURBED_ELEMENTS_AT_ONCE // (3 * 224 * 224) == 6
    assert perturbations_at_once(torch.zeros(16, 3, 224, 224)) == 1


def test_lime_gives_no_r2_where_the_outputs_do_not_vary():
    """A constant model: nothing to explain, so no R^2 (it was 1.0, a "perfect" surrogate of nothing)."""
    model = nn.Linear(4, 1)
    nn.init.zeros_(model.weight)
    result = attribute(model, torch.rand(1, 4), "lime", n_samples=20)
    assert torch.equal(result.values, torch.zeros(1, 4)) and np.isnan(result.details["surrogate_r2"][0])


def test_deeplift_shap_runs_the_reference_batch_in_chunks_with_captums_values():
    """Attacker round 13, F2: Captum runs every (example, reference) pair at once (+4.6 GB at 100 references)."""
    from captum.attr import DeepLiftShap

    from trainfer.analysis.attribution_shap import DEEPLIFT_SHAP_ROWS

    model = relu_conv_net().eval()
    x, references = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(20, 1, 8, 8, dtype=torch.float64)
    rows = []
    model.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    result = attribute(model, x, "deeplift_shap", target=1, baselines=references)
    assert (
        max(rows) <= 2 * DEEPLIFT_SHAP_ROWS < 2 * len(x) * len(references)
    )  # DeepLIFT runs rows and references together
    assert sum(rows) == len(x) + 2 * len(x) * len(references)  # the scores once, then every pair
    expected = DeepLiftShap(model).attribute(x, baselines=references, target=1)
    torch.testing.assert_close(result.values, expected, rtol=1e-9, atol=1e-12)
