"""Cross-layer equalization: exact in float64 through ReLU/LeakyReLU, evens per-channel ranges, skips what it must."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer.models import digits_net
from trainfer.reparam.equalize import equalize, find_pairs
from trainfer.testing import assert_close, randomize_batchnorm

DT = torch.float64


def _spiky(conv: nn.Conv2d, seed: int) -> nn.Conv2d:
    """Give the conv per-output-channel outliers (what folded BN scales do to a kernel)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        factors = torch.rand(conv.out_channels, generator=generator, dtype=DT) * 20 + 0.05
        conv.weight.mul_(factors.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    return conv


@st.composite
def chain(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    channels = [groups * draw(st.integers(1, 3)) for _ in range(3)]
    layers = []
    for index in range(2):
        kernel, stride = draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
        g = draw(st.sampled_from([1, groups]))
        conv = nn.Conv2d(channels[index], channels[index + 1], kernel, stride, kernel // 2, groups=g, dtype=DT)
        layers += [conv, draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1)]))]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels[2], 5, dtype=DT)]
    return nn.Sequential(*layers, *head), channels[0]


@settings(max_examples=20)
@given(network=chain(), seed=st.integers(0, 1000))
def test_equalization_is_exact_in_float64_and_balances_the_ranges(network, seed):
    model, in_channels = network
    torch.manual_seed(seed)
    for module in model:
        if isinstance(module, nn.Conv2d):
            _spiky(module, seed)
    x = torch.randn(2, in_channels, 9, 8, dtype=DT)
    equalized, report = equalize(model, x)
    with torch.no_grad():
        assert_close(equalized(x), model(x))  # float64: 1e-9 of the output scale
    assert [(p.first, p.second) for p in report.pairs] == [("0", "2"), ("2", "6")]
    assert report.verification["float64"].ok
    # The pair rescaled last in a sweep ends balanced: channel i has the same range in both layers.
    modules = dict(equalized.named_modules())
    last = report.pairs[-1]
    first = modules[last.first].weight.abs().flatten(1).amax(1)
    second = modules[last.second].weight.abs().amax(0)
    assert_close(first, second)


def test_model_weights_are_untouched_and_float32_within_tolerance():
    torch.manual_seed(0)
    model = nn.Sequential(_spiky(nn.Conv2d(3, 8, 3, padding=1), 1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    equalized, report = equalize(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert_close(equalized(x), model(x))
    assert report.pairs[0].spread_after < report.pairs[0].spread_before / 2


def test_not_homogeneous_or_branching_activations_are_left_alone():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) + y  # the activation has two readers: rescaling it would change the sum

    relu6 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1))  # clipping: not homogeneous
    assert find_pairs(torch.fx.symbolic_trace(Skip())) == []
    assert find_pairs(torch.fx.symbolic_trace(relu6)) == []
    _, report = equalize(relu6, torch.randn(1, 3, 4, 4))
    assert report.pairs == []


def test_deployed_digits_net_equalizes_every_pair_exactly():
    model = randomize_batchnorm(digits_net(width=8)).eval()
    x = torch.randn(4, 1, 8, 8)
    deployed = trainfer.deploy(model, x)
    equalized, report = equalize(deployed, x)
    assert len(report.pairs) == 4 and report.pairs[-1].second == "head.3"
    assert report.verification["float64"].max_rel_error <= 1e-12
    assert trainfer.recipe_of(equalized).form == "deploy"


def test_a_wrong_rescaling_would_be_caught(monkeypatch):
    """The verification is live: break the rule (scale only the first layer) and equalize refuses."""
    from trainfer.reparam import equalize as module

    def broken(first, second):
        with torch.no_grad():
            first.weight.mul_(2)
            first.bias.mul_(2)
        return torch.ones(first.out_channels, dtype=first.weight.dtype)

    monkeypatch.setattr(module, "_rescale", broken)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(trainfer.EquivalenceError, match="equalization changed"):
        equalize(model, torch.randn(2, 3, 4, 4))
