"""Property tests of trainfer.algebra: every fold against the modules / functional ops it replaces.

All in float64 with random non-trivial BatchNorm statistics; configurations drawn by hypothesis
(odd channel counts, asymmetric kernels, strides, dilation, groups incl. depthwise).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainfer.reparam import algebra as A
from trainfer.reparam.blocks.base import fold_identity_bn
from trainfer.testing import assert_close, randomize_batchnorm

DT = torch.float64
EXAMPLES = 40


def _bn(channels: int, seed: int, dims: int = 2) -> nn.modules.batchnorm._BatchNorm:
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return randomize_batchnorm(cls(channels, dtype=DT), seed).eval()


def _conv(in_channels, out_channels, kernel, *, bias=True, **kw) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, bias=bias, dtype=DT, **kw)


@st.composite
def grouped_channels(draw, max_groups: int = 4, max_per_group: int = 3):
    """``(in_channels, out_channels, groups)`` with both channel counts divisible by groups."""
    groups = draw(st.integers(1, max_groups))
    return groups * draw(st.integers(1, max_per_group)), groups * draw(st.integers(1, max_per_group)), groups


kernels = st.tuples(st.integers(1, 5), st.integers(1, 5))
pairs12 = st.tuples(st.integers(1, 2), st.integers(1, 2))


@settings(max_examples=EXAMPLES)
@given(
    channels=grouped_channels(),
    kernel=kernels,
    stride=pairs12,
    dilation=pairs12,
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_fuse_bn_equals_conv_then_batchnorm(channels, kernel, stride, dilation, padding, bias, seed):
    in_channels, out_channels, groups = channels
    conv = _conv(
        in_channels, out_channels, kernel, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    bn = _bn(out_channels, seed)
    x = torch.randn(2, in_channels, 11, 12, dtype=DT)
    folded = A.fuse_bn(A.ConvOp.from_module(conv), bn)
    assert_close(A.to_conv2d(folded)(x), bn(conv(x)))


@settings(max_examples=EXAMPLES)
@given(
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.integers(1, 3),
    k=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    extra=st.integers(0, 1),
    seed=st.integers(0, 1000),
)
def test_add_of_square_asymmetric_and_pointwise_branches_with_different_groups(
    groups, per_group, k, stride, dilation, extra, seed
):
    """kxk (groups g) + 1xk (depthwise) + kx1 (dense) + 1x1 (g): one conv with gcd groups."""
    channels = groups * per_group
    half = dilation * (k - 1) // 2 + extra  # the kxk conv's padding; every branch is centred on it
    branches = {
        "kxk": _conv(channels, channels, k, padding=half, groups=groups),
        "1xk": _conv(channels, channels, (1, k), padding=(half - dilation * (k - 1) // 2, half), groups=channels),
        "kx1": _conv(channels, channels, (k, 1), padding=(half, half - dilation * (k - 1) // 2)),
        "1x1": _conv(channels, channels, 1, padding=half - dilation * (k - 1) // 2, groups=groups),
    }
    for conv in branches.values():
        conv.stride, conv.dilation = (stride, stride), (dilation, dilation)
    bns = {name: _bn(channels, seed + i) for i, name in enumerate(branches)}
    x = torch.randn(2, channels, 9, 10, dtype=DT)
    reference = sum(bns[name](conv(x)) for name, conv in branches.items())
    ops = [A.fuse_bn(A.ConvOp.from_module(conv), bns[name]) for name, conv in branches.items()]
    folded = A.add(ops, names=list(branches))
    assert folded.kernel_size == (k, k) and folded.groups == 1
    assert_close(A.to_conv2d(folded)(x), reference)


def test_add_refuses_a_misaligned_branch_and_names_it():
    square = A.ConvOp.from_module(_conv(4, 4, 3, padding=1))
    shifted = A.ConvOp.from_module(_conv(4, 4, (1, 3), padding=(1, 1)))
    with pytest.raises(A.AlgebraError, match="horizontal: padding"):
        A.add([square, shifted], names=["square", "horizontal"])
    with pytest.raises(A.AlgebraError, match="stride"):
        A.add([square, A.ConvOp.from_module(_conv(4, 4, 3, padding=1, stride=2))])


@settings(max_examples=EXAMPLES)
@given(
    first_groups=st.sampled_from([1, 2, 4]),
    second_groups=st.sampled_from([1, 2, 4]),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    seed=st.integers(0, 1000),
)
def test_sequential_pointwise_then_kxk_with_bn_and_pad(first_groups, second_groups, k, stride, pad, seed):
    """DBB's 1x1 - BN - kxk: the 1x1 pads (border = BN shift) and the kxk conv does not."""
    channels, middle, out = 4, 8, 4
    pointwise = _conv(channels, middle, 1, padding=pad, groups=first_groups)
    bn = _bn(middle, seed)
    spatial = _conv(middle, out, k, stride=stride, groups=second_groups)
    x = torch.randn(2, channels, 8, 9, dtype=DT)
    folded = A.sequential(A.fuse_bn(A.ConvOp.from_module(pointwise), bn), A.ConvOp.from_module(spatial))
    assert folded.groups == min(first_groups, second_groups)  # gcd of powers of two
    assert_close(A.to_conv2d(folded)(x), spatial(bn(pointwise(x))))


@settings(max_examples=EXAMPLES)
@given(
    first_groups=st.sampled_from([1, 2, 3, 6]),
    second_groups=st.sampled_from([1, 2, 3, 6]),
    kernel=kernels,
    strides=st.tuples(pairs12, pairs12),
    dilation=pairs12,
    seed=st.integers(0, 1000),
)
def test_sequential_kxk_then_pointwise(first_groups, second_groups, kernel, strides, dilation, seed):
    spatial = _conv(6, 6, kernel, stride=strides[0], padding=1, dilation=dilation, groups=first_groups)
    bn = _bn(6, seed)
    pointwise = _conv(6, 12, 1, stride=strides[1], groups=second_groups)
    x = torch.randn(2, 6, 9, 9, dtype=DT)
    folded = A.sequential(A.fuse_bn(A.ConvOp.from_module(spatial), bn), A.ConvOp.from_module(pointwise))
    assert_close(A.to_conv2d(folded)(x), pointwise(bn(spatial(x))))


@settings(max_examples=EXAMPLES)
@given(
    channels=st.integers(1, 5),
    kernel=kernels,
    stride=st.one_of(st.none(), pairs12),
    data=st.data(),
)
def test_avg_pool_as_conv(channels, kernel, stride, data):
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in kernel)
    x = torch.randn(2, channels, 9, 8, dtype=DT)
    op = A.avg_pool(channels, kernel, stride, padding, dtype=DT)
    reference = F.avg_pool2d(x, kernel, stride, padding, count_include_pad=True)
    assert_close(A.to_conv2d(op)(x), reference)


@settings(max_examples=EXAMPLES)
@given(
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    kernel=st.tuples(st.sampled_from([1, 3, 5, 7]), st.sampled_from([1, 3, 5])),
    dilation=pairs12,
    seed=st.integers(0, 1000),
)
def test_identity_and_batchnorm_as_conv(groups, per_group, kernel, dilation, seed):
    channels = groups * per_group
    x = torch.randn(2, channels, 7, 6, dtype=DT)
    identity = A.identity(channels, kernel, groups, dilation, dtype=DT)
    assert torch.equal(A.to_conv2d(identity)(x), x)
    bn = _bn(channels, seed)
    assert_close(A.to_conv2d(fold_identity_bn(bn, groups, dilation))(x), bn(x))  # a skip branch's BatchNorm


def test_identity_needs_an_odd_kernel():
    with pytest.raises(A.AlgebraError, match="odd kernel"):
        A.identity(4, 2)


@settings(max_examples=EXAMPLES)
@given(
    channels=grouped_channels(),
    kernel=kernels,
    target_growth=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=pairs12,
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2)),
)
def test_pad_kernel_and_pad_input_keep_the_output(channels, kernel, target_growth, dilation, pads):
    in_channels, out_channels, groups = channels
    conv = _conv(in_channels, out_channels, kernel, dilation=dilation, groups=groups)
    x = torch.randn(2, in_channels, 12, 11, dtype=DT)
    op = A.ConvOp.from_module(conv)
    target = (kernel[0] + 2 * target_growth[0], kernel[1] + 2 * target_growth[1])
    padded_kernel = A.pad_kernel(op, target)
    assert padded_kernel.kernel_size == target
    assert_close(A.to_conv2d(padded_kernel)(x), conv(x))
    left_right, top_bottom = pads
    with_input_pad = A.pad_input(op, (left_right, left_right, top_bottom, top_bottom))
    reference = conv(F.pad(x, (left_right, left_right, top_bottom, top_bottom)))
    assert_close(A.to_conv2d(with_input_pad)(x), reference)


def test_pad_kernel_and_pad_input_refuse_what_is_not_exact():
    op = A.ConvOp.from_module(_conv(2, 2, 3))
    with pytest.raises(A.AlgebraError, match="cannot be centred"):
        A.pad_kernel(op, 4)
    with pytest.raises(A.AlgebraError, match="asymmetric"):
        A.pad_input(op, (1, 0, 1, 1))


@settings(max_examples=EXAMPLES)
@given(
    groups=st.sampled_from([2, 3, 4, 6]),
    in_per_group=st.integers(1, 2),
    out_per_group=st.integers(1, 2),
    kernel=kernels,
    data=st.data(),
)
def test_regroup_keeps_the_output(groups, in_per_group, out_per_group, kernel, data):
    divisor = data.draw(st.sampled_from([d for d in range(1, groups + 1) if groups % d == 0]))
    conv = _conv(groups * in_per_group, groups * out_per_group, kernel, padding=1, groups=groups)
    x = torch.randn(2, groups * in_per_group, 6, 7, dtype=DT)
    regrouped = A.regroup(A.ConvOp.from_module(conv), divisor)
    assert regrouped.groups == divisor
    assert_close(A.to_conv2d(regrouped)(x), conv(x))


def test_regroup_refuses_a_non_divisor():
    with pytest.raises(A.AlgebraError, match="regroup"):
        A.regroup(A.ConvOp.from_module(_conv(6, 6, 1, groups=3)), 2)


@settings(max_examples=EXAMPLES)
@given(
    in_features=st.integers(1, 9),
    out_features=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_linear_then_batchnorm1d(in_features, out_features, bias, seed):
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=DT)
    after = _bn(out_features, seed, dims=1)
    x = torch.randn(5, in_features, dtype=DT)
    fused_after = A.to_linear(*A.fuse_linear_bn(linear.weight.detach(), linear.bias, after))
    assert_close(fused_after(x), after(linear(x)))


def test_to_conv2d_keeps_dtype_and_refuses_to_drop_a_bias():
    op = A.fuse_bn(A.ConvOp.from_module(_conv(3, 4, 3, bias=False)), _bn(4, 0))
    assert A.to_conv2d(op).weight.dtype == DT
    with pytest.raises(A.AlgebraError, match="non-zero bias"):
        A.to_conv2d(op, bias=False)


def test_syncbatchnorm_folds_like_batchnorm():
    conv = _conv(3, 4, 3, padding=1)
    bn = _bn(4, 5)
    sync = nn.SyncBatchNorm(4, dtype=DT).eval()
    sync.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    assert_close(A.to_conv2d(A.fuse_bn(A.ConvOp.from_module(conv), sync))(x), bn(conv(x)))
