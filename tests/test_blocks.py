"""Every block: train form in eval() vs its reparameterized form, one conv executed, clear errors."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainfer.blocks import ACBlock, DiverseBranchBlock, MobileOneBlock, ReparamBlock, RepVGGBlock
from trainfer.testing import TOLERANCE, batch_norm_calls, count_aten_ops, randomize_batchnorm

BLOCKS = [RepVGGBlock, ACBlock, DiverseBranchBlock, MobileOneBlock]

SUPPORTS_DILATION = {RepVGGBlock: True, ACBlock: True, DiverseBranchBlock: False, MobileOneBlock: True}


def _extra(cls, groups: int) -> dict:
    """Block-specific options exercised everywhere: several kxk branches, a wider DBB middle."""
    return {MobileOneBlock: {"num_conv_branches": 3}, DiverseBranchBlock: {"internal_channels": 2 * groups}}.get(
        cls, {}
    )


def _block(cls, *args, seed=0, **kwargs) -> ReparamBlock:
    block = cls(*args, **_extra(cls, kwargs.get("groups", 1)), **kwargs)
    return randomize_batchnorm(block, seed).eval()


def _check(block: ReparamBlock, x: torch.Tensor) -> ReparamBlock:
    """Fold ``block`` (already in eval mode) and check it against its train form, in place.

    The error is measured relative to the larger of the output's scale and the branch sum's: a
    ReLU can zero all but a tiny output, while the rounding both forms make is relative to the
    values summed before it (a 1-channel block once gave 1.3e-5 of a 0.014 output, 3.6e-7 of its sum).
    """
    with torch.no_grad():
        reference, summed = block(x), block.forward_branches(x)
    block.reparameterize()
    with torch.no_grad():
        error = float((block(x) - reference).abs().max())
    scale = max(float(reference.abs().max()), float(summed.abs().max()))
    assert error <= TOLERANCE[x.dtype] * scale, f"error {error:.3e} exceeds {TOLERANCE[x.dtype]:.0e} of {scale:.3e}"
    counts = count_aten_ops(block, x)
    se_convs = 0 if isinstance(block.se, nn.Identity) else 2
    assert counts["convolution"] == 1 + se_convs and batch_norm_calls(block, x) == 0, counts
    return block


def _both_dtypes(cls, config: dict, x64: torch.Tensor, seed: int) -> None:
    """The float64 model folded in float64, and a float32 copy of the train form folded in float32."""
    block = _block(cls, **config, dtype=torch.float64, seed=seed)
    block32 = copy.deepcopy(block).float()
    _check(block, x64)
    _check(block32, x64.float())


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize(
    "config",
    [
        {"in_channels": 4, "out_channels": 4},
        {"in_channels": 6, "out_channels": 9, "kernel_size": 5, "stride": 2, "groups": 3},
        {"in_channels": 5, "out_channels": 5, "groups": 5, "padding": 2},
        {"in_channels": 3, "out_channels": 7, "kernel_size": 7, "stride": (2, 1)},
    ],
)
def test_block_folds_exactly(cls, config):
    _both_dtypes(cls, config, torch.randn(2, config["in_channels"], 9, 10, dtype=torch.float64), seed=1)


@pytest.mark.parametrize("cls", BLOCKS)
def test_block_folds_in_bfloat16_within_its_tolerance(cls):
    block = _block(cls, 6, 6, groups=2, dtype=torch.bfloat16)
    _check(block, torch.randn(2, 6, 8, 8, dtype=torch.bfloat16))
    assert block.reparam.weight.dtype == torch.bfloat16


@st.composite
def block_configs(draw, cls):
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = draw(st.sampled_from([in_channels, groups * draw(st.integers(1, 3))]))
    if draw(st.booleans()):  # depthwise
        groups, out_channels = in_channels, in_channels
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.integers(1, 2)) if SUPPORTS_DILATION[cls] else 1
    same = dilation * (kernel - 1) // 2
    padding = draw(st.sampled_from([None, same, same + 1]))
    stride = draw(st.sampled_from([1, 2, (1, 2)]))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
    }


def _property(cls):
    @settings(max_examples=40)
    @given(data=st.data(), seed=st.integers(0, 1000))
    def check(data, seed):
        config = data.draw(block_configs(cls))
        size = 2 * (config["kernel_size"] - 1) * config["dilation"] + 1
        generator = torch.Generator().manual_seed(seed)  # reproducible: hypothesis replays a failure
        x = torch.randn(2, config["in_channels"], size, size + 1, dtype=torch.float64, generator=generator)
        _both_dtypes(cls, config, x, seed)

    return check


test_repvgg_block_property = _property(RepVGGBlock)
test_acblock_property = _property(ACBlock)
test_diverse_branch_block_property = _property(DiverseBranchBlock)
test_mobileone_block_property = _property(MobileOneBlock)


def test_repvgg_identity_branch_only_where_shapes_allow():
    assert _block(RepVGGBlock, 4, 4).identity is not None
    assert _block(RepVGGBlock, 4, 6).identity is None
    assert _block(RepVGGBlock, 4, 4, stride=2).identity is None
    assert _block(RepVGGBlock, 4, 4, padding=2).identity is None  # output grows: no identity
    assert _block(MobileOneBlock, 4, 4, 1).scale is None  # a 1x1 block has no separate 1x1 branch


def test_squeeze_excitation_stays_after_the_fused_conv():
    for cls in (RepVGGBlock, MobileOneBlock):
        block = _block(cls, 6, 6, use_se=True, dtype=torch.float64)
        _check(block, torch.randn(2, 6, 7, 7, dtype=torch.float64))


@pytest.mark.parametrize("cls", BLOCKS)
def test_reparameterize_frees_branches_and_is_idempotent(cls):
    block = _block(cls, 4, 4, dtype=torch.float64)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    assert block.reparameterize() is block and block.deploy
    weight = block.reparam.weight.clone()
    assert block.reparameterize() is block
    assert torch.equal(block.reparam.weight, weight)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert all(not hasattr(block, name) for name in cls.branch_names)
    assert sum(p.numel() for p in block.parameters()) == weight.numel() + 4
    assert block(x).shape == (1, 4, 6, 6)


@pytest.mark.parametrize("cls", BLOCKS)
def test_deploy_flag_builds_the_fused_form_and_loads_its_state(cls):
    trained = _block(cls, 6, 6, stride=2, groups=3).reparameterize()
    deployed = cls(6, 6, stride=2, groups=3, deploy=True, **_extra(cls, 3)).eval()
    deployed.load_state_dict(trained.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 6, 8, 8)
    assert torch.equal(deployed(x), trained(x))


@pytest.mark.parametrize("cls", BLOCKS)
def test_training_form_learns_through_every_branch_and_keeps_the_callers_copy(cls):
    block = _block(cls, 4, 4)
    block.train()
    block(torch.randn(4, 4, 6, 6)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters() if p.requires_grad)
    snapshot = copy.deepcopy(block.state_dict())
    folded = copy.deepcopy(block).eval().reparameterize()
    assert folded.deploy and not block.deploy
    assert all(torch.equal(snapshot[k], v) for k, v in block.state_dict().items())


def test_syncbatchnorm_converted_block_still_folds():
    block = nn.SyncBatchNorm.convert_sync_batchnorm(_block(DiverseBranchBlock, 4, 4, dtype=torch.float64)).eval()
    _check(block, torch.randn(2, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (RepVGGBlock, {"kernel_size": 4}, "kernel_size must be odd"),
        (ACBlock, {"kernel_size": (3, 2)}, "kernel_size must be odd"),
        (RepVGGBlock, {"groups": 3}, "divisible by groups=3"),
        (MobileOneBlock, {"padding": 0}, "padding .* is smaller"),
        (ACBlock, {"stride": 0}, "stride must be positive"),
        (DiverseBranchBlock, {"dilation": 2}, "average-pooling branch has no dilation"),
        (DiverseBranchBlock, {"groups": 2, "internal_channels": 3}, "internal_channels must be a positive multiple"),
        (MobileOneBlock, {"num_conv_branches": 0}, "num_conv_branches must be a positive int"),
        (RepVGGBlock, {"kernel_size": "3"}, "kernel_size must be an int or a pair"),
    ],
)
def test_bad_configurations_raise_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(4, 8, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", BLOCKS)
def test_block_folds_on_cuda(cls):
    block = _block(cls, 6, 6, groups=2, dtype=torch.float64).cuda()
    _check(block, torch.randn(2, 6, 9, 9, dtype=torch.float64, device="cuda"))
    assert block.reparam.weight.is_cuda
