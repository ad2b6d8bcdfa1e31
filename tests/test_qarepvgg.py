"""QARepVGGBlock: BN only on the kxk branch and after the sum; folds exactly by the shared algebra."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainfer
from trainfer.blocks import QARepVGGBlock
from trainfer.testing import assert_close, count_aten_ops, randomize_batchnorm

DT = torch.float64


@st.composite
def block_config(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    same = draw(st.booleans())  # same channels: the identity branch can exist
    out_channels = in_channels if same else groups * draw(st.integers(1, 3))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": draw(st.sampled_from([1, 3, 5])),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
    }


def _block(config, seed, dtype=DT):
    torch.manual_seed(seed)
    block = QARepVGGBlock(**config, dtype=dtype)
    return randomize_batchnorm(block, seed).eval()


@settings(max_examples=40)
@given(config=block_config(), seed=st.integers(0, 1000))
def test_fold_is_exact_in_float64(config, seed):
    block = _block(config, seed)
    x = torch.randn(2, config["in_channels"], 9, 10, dtype=DT)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        assert_close(block(x), expected)
    assert block.deploy and not hasattr(block, "post_bn") and not hasattr(block, "pointwise")


def test_structure_identity_and_pointwise_carry_no_batchnorm():
    block = QARepVGGBlock(6, 6)
    norms = [name for name, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ["dense.bn", "post_bn"]
    assert block.pointwise.bias is None and block.has_identity
    assert not QARepVGGBlock(6, 6, stride=2).has_identity and not QARepVGGBlock(6, 8).has_identity


def test_float32_fold_within_tolerance_and_one_convolution_runs():
    config = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "stride": 1, "dilation": 1, "groups": 2}
    block = _block(config, 3, torch.float32)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected = block(x)
        assert count_aten_ops(block, x)["convolution"] == 2
        block.reparameterize()
        assert_close(block(x), expected)
        assert count_aten_ops(block, x)["convolution"] == 1


def test_automatic_folder_deploys_a_stack_of_blocks_exactly():
    model = nn.Sequential(QARepVGGBlock(3, 8, stride=2), QARepVGGBlock(8, 8), QARepVGGBlock(8, 8, use_se=True))
    randomize_batchnorm(model, 1).eval()
    x = torch.randn(2, 3, 16, 16)
    deployed = trainfer.deploy(model, x, protocols=False)  # the folder alone, verified in float64 and float32
    executed = count_aten_ops(deployed, x)
    assert executed["convolution"] == 3 + 2 and not any("batch_norm" in op for op in executed)


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError, match="divisible by groups"):
        QARepVGGBlock(4, 6, groups=4)
