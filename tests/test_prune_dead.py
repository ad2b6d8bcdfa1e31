"""Exact dead-channel removal in deploy (``prune_dead=True``): planted dead channels in each situation.

Each model is plain PyTorch with channels planted dead (a zero filter with a bias, BatchNorm with
gamma = 0, a ReLU whose input is provably never positive, an input channel no consumer reads) in a
chain, a residual add, a concat, depthwise and grouped convs, and flatten -> Linear. Each test checks
the deployed form against the original in float64 (<= 1e-9 relative, on fresh random inputs), that the
kernels really shrank where removal is exact, and that the channels stayed where it is not (a
channel dead in one addend only; a non-zero constant read through zero padding).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from torch import nn
from torch.nn import functional as F

import trainfer
from trainfer.errors import InputTypeError
from trainfer.testing import assert_close, count_aten_ops, randomize_batchnorm

LIMIT_S = 60


@pytest.fixture(autouse=True)
def _seeded():
    """Random weights may plant dead channels of their own (a filter all negative after a ReLU): seed them."""
    torch.manual_seed(0)


def deployed(model: nn.Module, shape=(2, 3, 8, 8), **options) -> nn.Module:
    """``model`` (eval, float64) deployed with ``prune_dead=True``, checked against it (1e-9)."""
    model.eval().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with time_limit(LIMIT_S):
        result = trainfer.deploy(model, x, prune_dead=True, **options)
    for _ in range(2):
        fresh = torch.randn(*shape, dtype=torch.float64) * 3
        with torch.no_grad():
            assert_close(result(fresh), model(fresh), 1e-9)
    return result


def convs(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every conv, in order."""
    return [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]


def kill_filter(conv: nn.Conv2d, channel: int, bias: float) -> None:
    """Plant a dead filter: zero weights, so the channel is the constant ``bias``."""
    with torch.no_grad():
        conv.weight[channel] = 0
        conv.bias[channel] = bias


class Chain(nn.Module):
    """conv-BN-ReLU -> 1x1 conv-BN-ReLU -> 3x3 conv -> global pool -> linear."""

    def __init__(self, width=8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 4)
        randomize_batchnorm(self)  # before the dead channels are planted

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


def test_gamma_zero_and_never_positive_relu_channels_go_into_the_next_bias():
    model = Chain()
    with torch.no_grad():
        model.b1.weight[1], model.b1.bias[1] = 0.0, 0.8  # BN gamma = 0: the constant 0.8 ...
        model.b2.weight[4], model.b2.bias[4] = 0.0, -0.3  # ... relu(-0.3) = 0 ...
        kill_filter(model.c3, 6, -1.0)  # ... relu(-1) = 0 ...
    result = deployed(model)
    # c1 loses channel 1 (its constant read by the unpadded 1x1 conv), c2 channel 4, c3 channel 6
    assert convs(result) == [(3, 7), (7, 7), (7, 7)]
    assert result.fc.in_features == 7
    lines = result.trainfer_report.dead_channels.layers
    assert any("removed output channels [1]" in line for line in lines)


def test_a_nonzero_constant_read_through_zero_padding_stays_and_a_zero_one_goes():
    model = Chain()
    with torch.no_grad():
        model.b2.weight[2], model.b2.bias[2] = 0.0, 0.5  # relu(0.5): 0.5 everywhere, but c3 pads: the border differs
        model.b2.weight[3], model.b2.bias[3] = 0.0, -0.5  # relu(-0.5) = 0: padding reads 0 too
    result = deployed(model)
    assert convs(result)[1:] == [(8, 7), (7, 8)]


def test_unused_input_channels_go_even_when_not_constant():
    model = Chain()
    with torch.no_grad():
        model.c2.weight[:, 5] = 0  # nobody reads channel 5 of the first block
    result = deployed(model)
    assert convs(result)[:2] == [(3, 7), (7, 8)]


class Residual(nn.Module):
    """``relu(a(x)) + relu(b(x))`` read by a 1x1 conv: a channel goes only if dead in both addends."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.a(x)) + F.relu(self.b(x)))


def test_residual_add_removes_a_channel_only_when_dead_in_every_addend():
    model = Residual()
    kill_filter(model.a, 1, -1.0)  # dead in a only: stays
    kill_filter(model.a, 3, 0.25)  # constant in both addends: goes, 0.25 + 0.75 into head's bias
    kill_filter(model.b, 3, 0.75)
    result = deployed(model)
    assert convs(result) == [(3, 5), (3, 5), (5, 4)]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(9, 3, 1)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], 1))


def test_concat_maps_each_input_channel_to_its_offset():
    model = Concat()
    kill_filter(model.a, 0, -2.0)
    kill_filter(model.b, 4, 0.3)  # sigmoid(0.3), a constant; head is 1x1
    result = deployed(model)
    assert convs(result) == [(3, 3), (3, 4), (7, 3)]


class Depthwise(nn.Module):
    """pointwise -> ReLU -> depthwise 3x3 (padding 0) -> ReLU -> pointwise."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, groups=6)
        self.project = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.project(F.relu(self.dw(F.relu(self.expand(x)))))


def test_depthwise_convs_lose_the_channels_they_carry_and_stay_depthwise():
    model = Depthwise()
    kill_filter(model.expand, 2, 0.5)  # constant 0.5 -> dw channel 2 constant (no padding) -> project absorbs
    kill_filter(model.dw, 4, -1.0)  # dw filter dead after ReLU: 0 -> expand channel 4 is then unused too
    result = deployed(model)
    dw = [m for m in result.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 1 and dw[0].groups == dw[0].in_channels == dw[0].out_channels == 4
    assert convs(result) == [(3, 4), (4, 4), (4, 4)]


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)
        nn.init.constant_(self.g.bias, 1.0)  # no filter of g is dead unless planted

    def forward(self, x):
        return self.head(F.relu(self.g(F.relu(self.a(x)))))


def test_grouped_convs_lose_channels_only_evenly_across_groups():
    uneven = Grouped()
    kill_filter(uneven.a, 1, -1.0)  # group 0 only: removing it would leave groups of 3 and 4
    assert convs(deployed(uneven))[:2] == [(3, 8), (8, 8)]
    even = Grouped()
    kill_filter(even.a, 1, -1.0)
    kill_filter(even.a, 6, -1.0)  # one in each group
    kill_filter(even.g, 0, -1.0)
    kill_filter(even.g, 5, -1.0)
    result = deployed(even)
    assert convs(result) == [(3, 6), (6, 6), (6, 2)]
    assert [m.groups for m in result.modules() if isinstance(m, nn.Conv2d)] == [1, 2, 1]


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3, padding=1, stride=2)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(x)).flatten(1))


def test_flatten_to_linear_removes_h_times_w_features_per_channel():
    model = Flat()
    kill_filter(model.c, 3, 0.4)  # constant 0.4 in 16 features: folded into fc's bias
    result = deployed(model)
    assert convs(result) == [(3, 4)] and result.fc.in_features == 4 * 16


def test_counts_fall_and_the_report_says_so():
    model = Chain(width=16)
    for channel in range(0, 16, 2):
        kill_filter(model.c3, channel, -1.0)
    pruned = deployed(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plain = trainfer.deploy(model, x)
    report = pruned.trainfer_report
    assert report.dead_channels.macs[1] < report.dead_channels.macs[0]
    assert report.options["prune_dead"] is True
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in plain.parameters())
    assert count_aten_ops(pruned, x) == count_aten_ops(plain, x)  # the same ops, narrower
    assert "dead channels: MACs" in str(report)


def test_nothing_dead_nothing_changes_and_the_option_is_checked():
    model = Chain()
    result = deployed(model)
    assert convs(result) == [(3, 8), (8, 8), (8, 8)] and result.trainfer_report.dead_channels.layers == []
    with pytest.raises(InputTypeError):
        trainfer.deploy(model, torch.randn(1, 3, 8, 8), prune_dead="yes")


def test_outputs_keep_every_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    kill_filter(model[0], 0, 1.0)
    assert convs(deployed(model)) == [(3, 4)]


# --------------------------------------------------------------------------- property-based
class RandomNet(nn.Module):
    """Blocks of conv-BN-ReLU (random kernels, padding, groups), some with a residual add; pool; linear."""

    def __init__(self, spec, dead, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.blocks, self.residual = nn.ModuleList(), []
        cin = 3
        for width, kernel, pad, groups, residual in spec:
            groups = groups if cin % groups == 0 and width % groups == 0 else 1
            conv = nn.Conv2d(cin, width, kernel, padding=kernel // 2 if pad else 0, groups=groups)
            self.blocks.append(nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU()))
            self.residual.append(residual and cin == width and pad)
            cin = width
        self.fc = nn.Linear(cin, 3)
        randomize_batchnorm(self, seed)
        with torch.no_grad():
            for block in self.blocks:
                bn = block[1]
                for channel in range(bn.num_features):
                    roll = torch.rand((), generator=generator)
                    if roll < dead:  # gamma 0, beta < 0: relu gives 0
                        bn.weight[channel], bn.bias[channel] = 0.0, -0.5
                    elif roll < 1.5 * dead:  # gamma 0, beta > 0: a constant
                        bn.weight[channel], bn.bias[channel] = 0.0, 0.5

    def forward(self, x):
        for block, residual in zip(self.blocks, self.residual):
            x = block(x) + x if residual else block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


block_spec = st.tuples(
    st.sampled_from([4, 6, 8]), st.sampled_from([1, 3]), st.booleans(), st.sampled_from([1, 2]), st.booleans()
)


@settings(max_examples=12, deadline=None)
@given(st.lists(block_spec, min_size=1, max_size=4), st.sampled_from([0.0, 0.3, 0.6]), st.integers(0, 2**16))
def test_random_architectures_stay_exact_and_never_widen(spec, dead, seed):
    model = RandomNet(spec, dead, seed)
    result = deployed(model, (2, 3, 6, 6))
    plain = trainfer.deploy(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    before = sum(p.numel() for p in plain.parameters())
    after = sum(p.numel() for p in result.parameters())
    assert after <= before
    report = result.trainfer_report.dead_channels
    assert (after < before) == bool(report.layers)
    assert report.macs[1] <= report.macs[0]


def test_a_pruned_deploy_form_saves_its_architecture_and_loads(tmp_path):
    model = Chain()
    kill_filter(model.c3, 6, -1.0)
    result = deployed(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    trainfer.save(result, tmp_path / "b", example_inputs=x[:1])
    loaded = trainfer.load(tmp_path / "b")
    assert convs(loaded)[-1] == (8, 7)
    torch.testing.assert_close(loaded.double()(x), result(x), rtol=0, atol=0)
