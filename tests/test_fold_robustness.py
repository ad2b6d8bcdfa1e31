"""``deploy`` on models nobody here wrote: it terminates, folds around what fx cannot trace, keeps
exact models exact, and folds the batch-norm part of BatchNorm subclasses (issue 14).

Every deploy runs under a wall-clock limit (a hang fails the test), on random non-trivial
BatchNorm statistics, in float64 (1e-9) and float32 (1e-5); what the deployed form executes is
counted with ``count_aten_ops``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from time_limit import time_limit
from torch import Tensor, nn
from torch.nn import functional as F

import trainfer
from trainfer.reparam.fold.trace import preserve_attributes
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm

LIMIT_S = 60


def deployed_both(model: nn.Module, x: Tensor, **options) -> nn.Module:
    """Deploy float64 and float32 copies within the time limit; check both; return the float64 form."""
    randomize_batchnorm(model)
    result = None
    for dtype in (torch.float32, torch.float64):
        reference = copy.deepcopy(model).to(dtype).eval()
        with time_limit(LIMIT_S):
            deployed = trainfer.deploy(reference, x.to(dtype), protocols=False, **options)
        with torch.no_grad():
            assert_close(deployed(x.to(dtype)), reference(x.to(dtype)))
        result = deployed
    return result


def executed(model: nn.Module, x: Tensor) -> dict[str, int]:
    counts = count_aten_ops(model, x.double())
    return {"conv": counts["convolution"], "bn": batch_norm_calls(model, x.double()), "pool": counts["avg_pool2d"]}


# --- 1. termination ---------------------------------------------------------------------------------


def test_average_pool_then_batch_norm_terminates_and_becomes_one_depthwise_conv():
    x = torch.randn(1, 8, 12, 12)
    model = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.BatchNorm2d(8))
    deployed = deployed_both(model, x)
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 0}


def test_avg_down_shortcut_terminates_keeps_the_pool_and_folds_the_batch_norm_into_the_conv():
    x = torch.randn(2, 8, 12, 12)
    model = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    deployed = deployed_both(model, x)
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 1}  # a 2x2 stride-2 conv would cost 4x


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_padded_pool_border_stays_exact(count_include_pad):
    x = torch.randn(2, 4, 7, 9)
    pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=count_include_pad)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), pool, nn.BatchNorm2d(4), nn.ReLU())
    deployed = deployed_both(model, x)
    # count_include_pad=False divides border windows by fewer taps: not a fixed kernel, the pool stays
    expected = {"conv": 2, "bn": 0, "pool": 0} if count_include_pad else {"conv": 1, "bn": 1, "pool": 1}
    assert executed(deployed, x) == expected


def test_unpadded_pool_folds_whatever_its_count_include_pad():
    x = torch.randn(2, 4, 8, 8)
    model = nn.Sequential(nn.ReLU(), nn.AvgPool2d(2, 2, count_include_pad=False), nn.BatchNorm2d(4))
    assert executed(deployed_both(model, x), x) == {"conv": 1, "bn": 0, "pool": 0}


# --- 3. Python scalars fold in float64 ------------------------------------------------------------------


class ScaledByScalars(nn.Module):
    """Python-number constants in the graph: ``* 0.1`` and ``/ 9`` (0.1 and 1/9 are not float32 numbers)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)) * 0.1
        return torch.relu(y / 9 + 0.3 - 1 / 7)


def test_python_scalars_fold_in_float64_so_an_exact_model_deploys_exactly():
    x = torch.randn(2, 3, 6, 6)
    deployed = deployed_both(ScaledByScalars(), x)
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-12
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 0}
    assert count_aten_ops(deployed, x.double())["mul"] == count_aten_ops(deployed, x.double())["div"] == 0


# --- 2. an untraceable op does not switch folding off above it ------------------------------------
# A Diverse Branch Block written the way its authors' repository writes it (DingXiaoH/DiverseBranchBlock):
# BNAndPadLayer fills the padded border by item assignment; the tracer records that write as a pure
# call (the padded tensor is fresh) and the folder reads pad + border fill as the BN with more padding.


def dbb_conv_bn(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
    se = nn.Sequential()
    se.add_module("conv", conv)
    se.add_module("bn", nn.BatchNorm2d(out_channels, affine=True))
    return se


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = torch.from_numpy(id_value).type_as(self.weight)
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps
                )
            else:
                pad_values = -self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0 : self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels :, :] = pad_values
            output[:, :, :, 0 : self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels :] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, nonlinear=None):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.dbb_origin = dbb_conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.dbb_avg = nn.Sequential()
        if groups < out_channels:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = dbb_conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))
        internal_channels_1x1_3x3 = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal_channels_1x1_3x3 == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels=in_channels, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module(
                "conv1", nn.Conv2d(in_channels, internal_channels_1x1_3x3, 1, 1, 0, groups=groups, bias=False)
            )
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal_channels_1x1_3x3))
        conv2 = nn.Conv2d(internal_channels_1x1_3x3, out_channels, kernel_size, stride, 0, groups=groups, bias=False)
        self.dbb_1x1_kxk.add_module("conv2", conv2)
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBBasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = DiverseBranchBlock(channels, channels, 3, 1, 1, nonlinear=nn.ReLU())
        self.conv2 = DiverseBranchBlock(channels, channels, 3, 1, 1)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + x)


def dbb_resnet() -> nn.Module:
    return nn.Sequential(
        DiverseBranchBlock(3, 8, 3, 2, 1, nonlinear=nn.ReLU()), DBBBasicBlock(8), DBBBasicBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def test_dbb_with_bn_and_pad_folds_to_the_authors_kernel_count_with_protocols_off():
    x = torch.randn(2, 3, 12, 12)
    model = dbb_resnet()
    before = executed(copy.deepcopy(model).double(), x)
    deployed = deployed_both(model, x)
    report = deployed.trainfer_report
    assert not [item for item in report.kept if "not traceable" in item], report.kept
    assert before == {"conv": 25, "bn": 30, "pool": 5}
    # The authors' converter (DiverseBranchBlock.switch_to_deploy) turns each block into one
    # `dbb_reparam` conv: one kernel per block. The folder reaches the same count, with no BN left.
    authors = sum(isinstance(m, DiverseBranchBlock) for m in model.modules())
    assert executed(deployed, x) == {"conv": authors, "bn": 0, "pool": 0}
    assert report.verification["float64"].max_rel_error <= 1e-9


class PaddedBranch(nn.Module):
    """DBB's 1x1-kxk branch in plain PyTorch: 1x1 conv -> BNAndPad -> kxk conv (stride, groups) -> BN."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, groups: int, affine: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=groups, bias=False)
        self.bn1 = BNAndPadLayer(pad_pixels=k // 2, num_features=mid, affine=affine)
        self.conv2 = nn.Conv2d(mid, cout, k, stride, 0, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


@pytest.mark.parametrize(
    ("cin", "mid", "cout", "k", "stride", "groups", "affine"),
    [(3, 5, 7, 3, 1, 1, True), (3, 7, 5, 5, 2, 1, True), (6, 9, 3, 3, 2, 3, True), (5, 5, 5, 3, 1, 5, False)],
)
def test_bn_and_pad_folds_exactly_into_one_conv(cin, mid, cout, k, stride, groups, affine):
    x = torch.randn(2, cin, 11, 9)
    model = PaddedBranch(cin, mid, cout, k, stride, groups, affine)
    deployed = deployed_both(model, x)
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 0}  # the authors' converter: 1 conv too
    with torch.no_grad():
        reference = copy.deepcopy(model).double().eval()
        assert_close(deployed(x.double()), reference(x.double()), 1e-9)


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(
    groups=st.sampled_from([1, 3]),
    widen=st.sampled_from([1, 2]),  # DBB's inner width: the input's (idconv) or twice it
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bn_and_pad_folds_exactly_for_drawn_shapes(groups, widen, k, stride, affine, seed):
    torch.manual_seed(seed)
    cin = 3 * groups
    x = torch.randn(2, cin, 9, 8)
    model = PaddedBranch(cin, widen * cin, cin, k, stride, groups, affine)
    deployed = deployed_both(model, x)  # float32 and float64, each checked against the model
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 0}
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9


class WrongBorder(BNAndPadLayer):
    """Writes the BN's constant plus one into the border: a pad whose border is not the bias cannot fold."""

    def forward(self, input):
        output = F.pad(self.bn(input), [1] * 4)
        value = self.bn.bias - self.bn.running_mean * self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        value = value.detach().view(1, -1, 1, 1) + 1
        output[:, :, :1, :] = value
        output[:, :, -1:, :] = value
        output[:, :, :, :1] = value
        output[:, :, :, -1:] = value
        return output


class PartialBorder(BNAndPadLayer):
    """Fills only the top and bottom rows: the left and right columns stay zero."""

    def forward(self, input):
        output = F.pad(self.bn(input), [1] * 4)
        value = self.bn.bias.detach().view(1, -1, 1, 1)
        output[:, :, :1, :] = value
        output[:, :, -1:, :] = value
        return output


@pytest.mark.parametrize("layer", [WrongBorder, PartialBorder])
def test_a_border_write_that_is_not_the_bias_on_every_side_is_traced_but_not_folded(layer):
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), layer(pad_pixels=1, num_features=4), nn.Conv2d(4, 4, 3))
    deployed = deployed_both(model, x)  # exact in float64 and float32
    assert not [item for item in deployed.trainfer_report.kept if "not traceable" in item]
    assert executed(deployed, x)["conv"] == 2  # conv+BN folded; the filled pad stays between the convs


class WritesIntoItsInput(nn.Module):
    """Item assignment into a tensor it did not make: an alias (the caller's tensor) would see it."""

    def forward(self, x):
        y = x * 2
        y[:, :, 0, :] = 0
        return y


class WritesThroughAView(nn.Module):
    """Pads, takes a view of the padded tensor, then writes into the border: the view must see the write."""

    def forward(self, x):
        out = F.pad(x, [1, 1, 1, 1])
        inner = out[:, :, :2]  # a view that aliases the first rows
        out[:, :, :1, :] = 3.0
        return out + inner.sum()


def test_item_assignment_into_a_padded_tensor_someone_already_read_stays_opaque():
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), WritesThroughAView(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    deployed = deployed_both(model, x)  # exact: a traced, pure write would lose the alias's update
    opaque = [item for item in deployed.trainfer_report.kept if "not traceable" in item]
    assert len(opaque) == 1 and opaque[0].startswith("1: not traceable"), deployed.trainfer_report.kept


def test_item_assignment_into_a_tensor_not_just_padded_still_stays_opaque():
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), WritesIntoItsInput(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    deployed = deployed_both(model, x)
    opaque = [item for item in deployed.trainfer_report.kept if "not traceable" in item]
    assert len(opaque) == 1 and opaque[0].startswith("1: not traceable"), deployed.trainfer_report.kept
    assert executed(deployed, x) == {"conv": 2, "bn": 0, "pool": 0}


class ConvBNWithResolution(nn.Module):
    """A child holding a plain attribute its parent reads, like timm's ``CascadedGroupAttention``."""

    def __init__(self, channels: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class WindowedLike(nn.Module):
    """timm's ``LocalWindowAttention`` shape: an untraceable forward (a branch on the input's size) that
    reads ``self.attn.resolution`` around the call of its foldable child."""

    def __init__(self, channels: int = 4, resolution: int = 6):
        super().__init__()
        self.attn = ConvBNWithResolution(channels, resolution)

    def forward(self, x):
        r = self.attn.resolution
        if x.shape[-1] <= r:
            return self.attn(x)
        return F.pad(self.attn(x[..., :r, :r]), (0, x.shape[-1] - r, 0, x.shape[-2] - r))


@pytest.mark.parametrize("opaque_inside_a_graph", [False, True])
def test_a_folded_child_keeps_the_plain_attributes_its_untraceable_parent_reads(opaque_inside_a_graph):
    x = torch.randn(2, 4, 8, 8)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), WindowedLike()) if opaque_inside_a_graph else WindowedLike()
    deployed = deployed_both(model, x)
    assert executed(deployed, x)["bn"] == 0  # the child's BatchNorm is folded into its conv
    windowed = deployed.get_submodule("1" if opaque_inside_a_graph else "")
    # conv -> bn folds to one conv, a chain of module calls: installed as an nn.Sequential, attribute kept
    assert type(windowed.attn) is nn.Sequential and windowed.attn.resolution == 6
    with torch.no_grad():  # a deep copy (as verify and users make) keeps them too
        assert_close(copy.deepcopy(deployed)(x.double()), deployed(x.double()))


# --- 4. BatchNorm subclasses with their own forward (timm's conventions) ---------------------------


class DropPath(nn.Module):
    """Stochastic depth the way timm writes it: the identity unless training."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's convention: a BatchNorm2d subclass whose forward runs F.batch_norm, then drop, then act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None):  # fmt: skip
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class InvertedResidualBNAct(nn.Module):
    """EfficientNet-style block on timm's norm-act layers: expand, depthwise, squeeze-excite, project."""

    def __init__(self, channels, expand=4):
        super().__init__()
        hidden = channels * expand
        self.conv_pw = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden, act_layer=nn.SiLU)
        self.conv_dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden, act_layer=nn.SiLU, drop_layer=lambda: DropPath(0.1))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, 4, 1), nn.SiLU(), nn.Conv2d(4, hidden, 1))
        self.conv_pwl = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = BatchNormAct2d(channels, apply_act=False)
        self.drop_path = DropPath(0.2)

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        y = y * self.se(y).sigmoid()
        return x + self.drop_path(self.bn3(self.conv_pwl(y)))


def test_timm_style_batch_norm_act_folds_its_batch_norm_into_the_conv_before_and_keeps_the_act():
    x = torch.randn(2, 8, 9, 9)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
                          InvertedResidualBNAct(8), InvertedResidualBNAct(8))  # fmt: skip
    before = count_aten_ops(copy.deepcopy(model).double().eval(), x.double())
    deployed = deployed_both(model, x)
    after = count_aten_ops(deployed, x.double())
    assert batch_norm_calls(deployed, x.double()) == 0
    assert after["convolution"] == before["convolution"] == 11  # squeeze-excite convs read a pooled value
    activations = ("relu", "relu_", "silu", "silu_", "sigmoid")
    assert [after[name] for name in activations] == [before[name] for name in activations] == [0, 1, 2, 4, 2]


class NormHead(nn.Module):
    """A final norm after the last activation, then global pooling and a classifier (three spellings)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.norm, self.pool, self.fc = nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        y = self.norm(self.body(x))
        if self.spelling == "module":
            return self.fc(torch.flatten(self.pool(y), 1))
        if self.spelling == "view":
            y = F.adaptive_avg_pool2d(y, 1)
            return self.fc(y.view(y.size(0), -1))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("spelling", ["module", "view", "mean"])
def test_batch_norm_then_global_pool_then_linear_folds_the_batch_norm_into_the_linear(spelling):
    x = torch.randn(2, 3, 7, 7)
    deployed = deployed_both(NormHead(spelling), x)
    counts = count_aten_ops(deployed, x.double())
    assert batch_norm_calls(deployed, x.double()) == 0 and counts["convolution"] == 1
    assert counts["addmm"] == 1 and counts["relu"] == 1


class ACBlock(nn.Module):
    """ACNet's asymmetric block the way its repository (DingXiaoH/ACNet, acb.py) writes it: when
    ``padding < kernel_size // 2`` the 1xk and kx1 branches read a cropped input."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels)
        if padding - kernel_size // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - kernel_size // 2, padding]
            ver_padding = [padding, padding - kernel_size // 2]
        else:
            self.crop = kernel_size // 2 - padding
            hor_padding = [0, padding]
            ver_padding = [padding, 0]
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, ver_padding, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, hor_padding, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels)
        self.hor_bn = nn.BatchNorm2d(out_channels)

    def forward(self, input):
        square_outputs = self.square_bn(self.square_conv(input))
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop : -self.crop]
            hor_input = input[:, :, self.crop : -self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical_outputs = self.ver_bn(self.ver_conv(ver_input))
        horizontal_outputs = self.hor_bn(self.hor_conv(hor_input))
        return square_outputs + vertical_outputs + horizontal_outputs


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 0), (3, 2, 0), (5, 1, 1), (5, 2, 0)])
def test_acnet_crop_slicing_folds_into_the_kernel(kernel, stride, padding):
    x = torch.randn(2, 3, 11, 12)
    deployed = deployed_both(nn.Sequential(ACBlock(3, 5, kernel, stride, padding), nn.ReLU()), x)
    assert executed(deployed, x) == {"conv": 1, "bn": 0, "pool": 0}
    assert count_aten_ops(deployed, x.double())["slice"] == 0


CROPS = [(1, 0, (0, 0), 1, 1), (2, 1, (0, 0), 1, 2), (2, 0, (0, 1), (2, 1), 1), (0, 3, (2, 0), 1, 3)]


@pytest.mark.parametrize(("rows", "cols", "padding", "dilation", "stride"), CROPS)
def test_algebra_crop_then_conv_is_one_conv_on_the_whole_input(rows, cols, padding, dilation, stride):
    from trainfer.reparam import algebra

    x = torch.randn(2, 4, 13, 14, dtype=torch.float64)
    conv = algebra.ConvOp(torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64),
                          (stride, stride), padding, algebra.pair(dilation), 2)  # fmt: skip
    cropped = x[:, :, rows : x.shape[2] - rows, cols : x.shape[3] - cols]
    crop = algebra.crop(4, rows, cols, dtype=torch.float64)
    assert_close(crop(x), cropped)
    assert_close(algebra.sequential(crop, conv)(x), conv(cropped))


def test_algebra_crop_needs_whole_taps_at_a_dilation_and_no_padding_where_it_crops():
    from trainfer.reparam import algebra

    conv = algebra.ConvOp(torch.randn(2, 2, 3, 3), torch.zeros(2), dilation=(2, 2))
    with pytest.raises(algebra.AlgebraError, match="whole number of taps"):
        algebra.crop_input(conv, 1, 0)
    with pytest.raises(algebra.AlgebraError, match="followed by zero padding 1"):
        algebra.crop_input(algebra.ConvOp(torch.randn(2, 2, 3, 3), torch.zeros(2), padding=(1, 0)), 1, 0)


def test_preserved_attributes_survive_a_deep_copy_of_a_graph_module():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1)))
    lost = copy.deepcopy(gm)
    gm.resolution = 6  # a plain attribute the graph does not read: a deep copy drops it
    assert not hasattr(copy.deepcopy(gm), "resolution") and not hasattr(lost, "resolution")
    preserve_attributes(gm, {"resolution": 6, "window": (2, 3)})
    copied = copy.deepcopy(gm)
    assert (copied.resolution, copied.window) == (6, (2, 3))
