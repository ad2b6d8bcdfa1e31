"""The fusion algebra against the modules it replaces, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainfer.reparam import algebra as A
from trainfer.reparam.blocks.base import fold_identity_bn
from trainfer.testing import assert_close, randomize_batchnorm

DT = torch.float64


def _bn(channels: int, seed: int) -> nn.BatchNorm2d:
    return randomize_batchnorm(nn.BatchNorm2d(channels, dtype=DT), seed).eval()


def test_conv_bn_and_parallel_sum_with_identity():
    x = torch.randn(2, 6, 9, 11, dtype=DT)
    conv3 = nn.Conv2d(6, 6, 3, 1, 1, groups=2, dtype=DT)
    bn3, bn_id = _bn(6, 1), _bn(6, 2)
    reference = bn3(conv3(x)) + bn_id(x)
    folded = A.add([A.fuse_bn(A.ConvOp.from_module(conv3), bn3), fold_identity_bn(bn_id, 6, (1, 1))])
    assert folded.groups == 2
    assert_close(folded(x), reference)


def test_bias_meeting_zero_padding_is_refused_not_approximated():
    first = A.ConvOp.from_module(nn.Conv2d(4, 4, 1, dtype=DT))
    second = A.ConvOp.from_module(nn.Conv2d(4, 4, 3, padding=1, dtype=DT))
    with pytest.raises(A.AlgebraError, match="zero padding"):
        A.sequential(first, second)


def test_bn_and_pad_composition_is_exact():
    x = torch.randn(2, 4, 7, 7, dtype=DT)
    pointwise = nn.Conv2d(4, 4, 1, padding=1, dtype=DT)
    bn = _bn(4, 3)
    spatial = nn.Conv2d(4, 5, 3, stride=2, dtype=DT)
    reference = spatial(bn(pointwise(x)))
    folded = A.sequential(A.fuse_bn(A.ConvOp.from_module(pointwise), bn), A.ConvOp.from_module(spatial))
    assert_close(folded(x), reference)


def test_avg_pool_as_conv():
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    folded = A.avg_pool(3, 3, 2, 1, dtype=DT)
    assert_close(folded(x), F.avg_pool2d(x, 3, 2, 1, count_include_pad=True))


def test_misaligned_branch_is_named():
    conv3 = A.ConvOp.from_module(nn.Conv2d(3, 3, 3, padding=1, dtype=DT))
    conv1 = A.ConvOp.from_module(nn.Conv2d(3, 3, 1, padding=1, dtype=DT))
    with pytest.raises(A.AlgebraError, match="pointwise"):
        A.add([conv3, conv1], ["dense", "pointwise"])


@pytest.mark.parametrize(
    ("kernel", "dilation", "stride", "padding", "groups"),
    [((3, 3), (2, 3), (1, 1), (2, 3), 1), ((3, 5), (4, 2), (2, 1), (1, 0), 3), ((1, 3), (5, 2), (1, 2), (0, 2), 1)],
)
def test_undilated_computes_what_the_dilated_kernel_computes(kernel, dilation, stride, padding, groups):
    torch.manual_seed(0)
    weight = torch.randn(6, 6 // groups, *kernel, dtype=torch.float64)
    op = A.ConvOp(weight, torch.randn(6, dtype=torch.float64), stride, padding, dilation, groups)
    wide = A.undilated(op)
    expected = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    assert wide.dilation == (1, 1) and wide.kernel_size == expected and wide.padding == op.padding
    assert int((wide.weight != 0).sum()) == int((weight != 0).sum())  # the same taps, zeros in between
    x = torch.randn(2, 6, 23, 19, dtype=torch.float64)
    assert_close(wide(x), op(x), 1e-12)


def test_undilated_leaves_an_undilated_op_as_it_is():
    op = A.ConvOp(torch.randn(2, 2, 3, 3), torch.zeros(2), padding=(1, 1))
    assert A.undilated(op) is op
