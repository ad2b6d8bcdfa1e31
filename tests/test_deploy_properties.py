"""Property tests: random multi-branch architectures, written in plain PyTorch, deploy exactly.

Each generated block sums a random set of branches reading the same input: a main kxk conv-BN
(always present, the largest kernel, sometimes dilated), 1x1 conv-BN, asymmetric 1xk / kx1 conv-BN, identity BN,
a per-channel scale, DBB's 1x1 -> kxk with BN-and-pad, an avg-pool branch, and an avg-pool -> BN
branch reading the block input; with random kernels, strides, groups and channel counts. Blocks nest
in sequences with ReLU between them. A second family mixes those blocks with regions that start
with an average pool (pool -> BN, pool -> conv-BN) and ResNet-D residual blocks with an avg-down
shortcut (pool -> 1x1 conv-BN). Every deploy runs under a wall-clock limit: a hang fails.
"""

from __future__ import annotations

import copy
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from torch import nn

import trainfer
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm

BRANCHES = ("point", "asym", "identity", "scale", "one_k", "pool", "pool_first")
LIMIT_S = 60


def conv_bn(cin, cout, kernel, stride=1, padding=0, groups=1, dilation=1, bias=False):
    """A conv (with a bias if ``bias``) and a BatchNorm."""
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


_conv_bn = conv_bn


class Scale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


class Branchy(nn.Module):
    """``sum(branch(x) for branch in branches)``; every branch is exact to fold."""

    def __init__(self, cin, cout, kernel, small, stride, groups, kinds, dilation=1, biases=(False,)):
        super().__init__()
        same = cin == cout and stride == 1
        has_bias = itertools.cycle(biases)  # which convs carry a bias, drawn by Hypothesis (so examples replay)

        def conv_bn(*args):
            return _conv_bn(*args, bias=next(has_bias))

        branches = [conv_bn(cin, cout, kernel, stride, dilation * (kernel // 2), groups, dilation)]
        if dilation > 1:  # only branches without spatial taps stay aligned with a dilated kernel
            kinds = [kind for kind in kinds if kind in ("point", "identity", "scale")]
        for kind in kinds:
            if kind == "point":
                branches.append(conv_bn(cin, cout, 1, stride, 0, groups))
            elif kind == "asym":
                branches.append(conv_bn(cin, cout, (1, small), stride, (0, small // 2), groups))
                branches.append(conv_bn(cin, cout, (small, 1), stride, (small // 2, 0), groups))
            elif kind == "identity" and same:
                branches.append(nn.BatchNorm2d(cout))
            elif kind == "scale" and same:
                branches.append(Scale(cout))
            elif kind == "one_k":
                branches.append(nn.Sequential(conv_bn(cin, cin, 1, 1, small // 2, groups),
                                              conv_bn(cin, cout, small, stride, 0, groups)))  # fmt: skip
            elif kind == "pool":
                branches.append(nn.Sequential(conv_bn(cin, cout, 1, 1, small // 2, groups),
                                              nn.AvgPool2d(small, stride, 0), nn.BatchNorm2d(cout)))  # fmt: skip
            elif kind == "pool_first" and cin == cout:  # a region that starts with a padded pool
                branches.append(nn.Sequential(nn.AvgPool2d(small, stride, small // 2), nn.BatchNorm2d(cout)))
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


def branchy(draw, channels):
    cout = draw(st.sampled_from([channels, draw(st.integers(1, 8))]))
    divisors = [g for g in range(1, min(channels, cout) + 1) if channels % g == 0 and cout % g == 0]
    kernel = draw(st.sampled_from([1, 3, 5]))
    small = draw(st.sampled_from([k for k in (1, 3, 5) if k <= kernel]))
    block = Branchy(
        channels,
        cout,
        kernel,
        small,
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from(divisors)),
        draw(st.lists(st.sampled_from(BRANCHES), max_size=4, unique=True)),
        draw(st.sampled_from([1, 1, 2])),
        tuple(draw(st.lists(st.booleans(), min_size=1, max_size=8))),
    )
    return block, cout


@st.composite
def architectures(draw):
    cin = draw(st.integers(1, 6))
    channels, blocks = cin, []
    for _ in range(draw(st.integers(1, 3))):
        block, channels = branchy(draw, channels)
        blocks += [block, nn.ReLU()] if draw(st.booleans()) else [nn.Sequential(block, nn.ReLU())]
    size = draw(st.integers(5, 10))
    return nn.Sequential(*blocks), (draw(st.integers(1, 2)), cin, size, size + draw(st.integers(0, 2)))


#: Average pools as they appear at region starts: padded (border = zeros, counted), unpadded, and
#: timm's avg-down (ceil_mode, count_include_pad=False: not a fixed kernel, stays a pool).
POOLS = (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=1, padding=1),
         dict(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False))  # fmt: skip


class AvgDown(nn.Module):
    """ResNet-D basic block: 3x3 stride-2 conv-BN, ReLU, 3x3 conv-BN, plus pool -> 1x1 conv-BN shortcut."""

    def __init__(self, cin, cout, pool):
        super().__init__()
        self.main = nn.Sequential(conv_bn(cin, cout, 3, 2, 1), nn.ReLU(), conv_bn(cout, cout, 3, 1, 1))
        self.shortcut = nn.Sequential(nn.AvgPool2d(**pool), conv_bn(cin, cout, 1))

    def forward(self, x):
        return torch.relu(self.main(x) + self.shortcut(x))


@st.composite
def pooled_architectures(draw):
    """Sequences of multi-branch blocks, pool-first regions and avg-down residual blocks."""
    cin = draw(st.integers(1, 6))
    channels, layers = cin, []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["branchy", "pool_bn", "pool_conv_bn", "avg_down"]))
        if kind == "branchy":
            block, channels = branchy(draw, channels)
        elif kind == "avg_down":
            cout = draw(st.integers(1, 8))
            block, channels = AvgDown(channels, cout, draw(st.sampled_from([POOLS[0], POOLS[2]]))), cout
        else:
            pool = nn.AvgPool2d(**draw(st.sampled_from(POOLS[:2])))
            if kind == "pool_bn":
                block = nn.Sequential(pool, nn.BatchNorm2d(channels))
            else:
                cout, kernel = draw(st.integers(1, 8)), draw(st.sampled_from([1, 3]))
                block, channels = nn.Sequential(pool, conv_bn(channels, cout, kernel, 1, kernel // 2)), cout
        layers += [block, nn.ReLU()]
    size = draw(st.integers(6, 12))
    return nn.Sequential(*layers), (draw(st.integers(1, 2)), cin, size, size + draw(st.integers(0, 2)))


def deploy_within_limit(model, x):
    with time_limit(LIMIT_S):
        return trainfer.deploy(model, x, protocols=False)


@settings(max_examples=30)
@given(architectures(), st.integers(0, 2**16))
def test_random_multi_branch_models_deploy_exactly(architecture, seed):
    model, shape = architecture
    torch.manual_seed(seed)
    randomize_batchnorm(model, seed)
    model = model.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    deployed = deploy_within_limit(model, x)
    assert_close(deployed(x), model(x))  # float64: 1e-9, independently of deploy's own check
    blocks = sum(isinstance(m, Branchy) for m in model.modules())
    assert batch_norm_calls(deployed, x) == 0
    assert count_aten_ops(deployed, x)["convolution"] == blocks, deployed.trainfer_report


@settings(max_examples=10)
@given(architectures())
def test_random_models_deploy_in_float32_within_tolerance(architecture):
    model, shape = architecture
    randomize_batchnorm(model)
    x = torch.randn(shape)
    deployed = deploy_within_limit(copy.deepcopy(model), x)
    assert_close(deployed(x), model.eval()(x))
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9


@settings(max_examples=15)
@given(pooled_architectures(), st.integers(0, 2**16))
def test_models_with_pools_at_region_starts_and_avg_down_shortcuts_terminate_and_fold(architecture, seed):
    model, shape = architecture
    torch.manual_seed(seed)
    randomize_batchnorm(model, seed)
    model = model.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    deployed = deploy_within_limit(copy.deepcopy(model), x)
    assert_close(deployed(x), model(x))
    pool_bns = sum(isinstance(m, nn.Sequential) and isinstance(m[-1], nn.BatchNorm2d) and isinstance(m[0], nn.AvgPool2d)
                   for m in model.modules())  # fmt: skip
    # Every BN after a conv folds; one right after a pool may stay a BN (an eval BN is one cheap affine) where
    # one conv would cost more than the pool and the BN (the cost model counts weights too: issue 23 item 13).
    assert batch_norm_calls(deployed, x) <= pool_bns, deployed.trainfer_report
    assert count_aten_ops(deployed, x)["convolution"] <= count_aten_ops(model, x)["convolution"] + pool_bns


@settings(max_examples=5)
@given(pooled_architectures())
def test_models_with_pools_deploy_in_float32_within_tolerance(architecture):
    model, shape = architecture
    randomize_batchnorm(model)
    x = torch.randn(shape)
    deployed = deploy_within_limit(copy.deepcopy(model), x)
    assert_close(deployed(x), model.eval()(x))
