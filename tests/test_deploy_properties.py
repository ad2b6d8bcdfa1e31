"""Property tests: random multi-branch architectures, written in plain PyTorch, deploy exactly.

Each generated block sums a random set of branches reading the same input: a main kxk conv-BN
(always present, the largest kernel, sometimes dilated), 1x1 conv-BN, asymmetric 1xk / kx1 conv-BN, identity BN,
a per-channel scale, DBB's 1x1 -> kxk with BN-and-pad, and an avg-pool branch; with random
kernels, strides, groups and channel counts. Blocks nest in sequences with ReLU between them.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm

BRANCHES = ("point", "asym", "identity", "scale", "one_k", "pool")


def conv_bn(cin, cout, kernel, stride=1, padding=0, groups=1, dilation=1):
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias=bool(torch.rand(()) < 0.5))
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


class Scale(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


class Branchy(nn.Module):
    """``sum(branch(x) for branch in branches)``; every branch is exact to fold."""

    def __init__(self, cin, cout, kernel, small, stride, groups, kinds, dilation=1):
        super().__init__()
        same = cin == cout and stride == 1
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
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return sum(branch(x) for branch in self.branches)


@st.composite
def architectures(draw):
    cin = draw(st.integers(1, 6))
    channels, blocks = cin, []
    for _ in range(draw(st.integers(1, 3))):
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
        )
        blocks += [block, nn.ReLU()] if draw(st.booleans()) else [nn.Sequential(block, nn.ReLU())]
        channels = cout
    size = draw(st.integers(5, 10))
    return nn.Sequential(*blocks), (draw(st.integers(1, 2)), cin, size, size + draw(st.integers(0, 2)))


@settings(max_examples=30)
@given(architectures(), st.integers(0, 2**16))
def test_random_multi_branch_models_deploy_exactly(architecture, seed):
    model, shape = architecture
    torch.manual_seed(seed)
    randomize_batchnorm(model, seed)
    model = model.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    deployed = trainfer.deploy(model, x, protocols=False)
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
    deployed = trainfer.deploy(copy.deepcopy(model), x, protocols=False)
    assert_close(deployed(x), model.eval()(x))
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9
