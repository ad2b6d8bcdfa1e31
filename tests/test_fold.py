"""The graph pass on plain, user-written PyTorch models (no trainfer imports in the models).

Every model is folded twice, as a float64 copy (checked at 1e-9) and as a float32 copy (1e-5),
with random non-trivial BatchNorm statistics; what the folded form executes is counted with
``count_aten_ops``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from trainfer.reparam.fold import FoldLog, fold
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm


def conv_bn(cin: int, cout: int, kernel, stride=1, padding=0, groups=1, dilation=1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout))


def folded(model: nn.Module, x: Tensor, seed: int = 0) -> tuple[nn.Module, FoldLog]:
    """Fold float64 and float32 copies; assert both exact; return the float64 result and its log."""
    randomize_batchnorm(model, seed)
    result = None
    for dtype in (torch.float32, torch.float64):
        reference = copy.deepcopy(model).to(dtype).eval()
        with torch.no_grad():
            expected = reference(x.to(dtype))
        gm, log = fold(copy.deepcopy(reference), (x.to(dtype),))
        with torch.no_grad():
            actual = gm(x.to(dtype))
        for a, e in zip(_tensors(actual), _tensors(expected), strict=True):
            assert_close(a, e)
        result = gm, log
    return result


def _tensors(output) -> list[Tensor]:
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return [output]


def convs(model: nn.Module, x: Tensor) -> int:
    return count_aten_ops(model, x.to(next(model.parameters()).dtype))["convolution"]


def bns(model: nn.Module, x: Tensor) -> int:
    return batch_norm_calls(model, x.to(next(model.parameters()).dtype))


def only_conv(model: nn.Module) -> nn.Conv2d:
    found = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(found) == 1, found
    return found[0]


# --- multi-branch blocks written by hand -----------------------------------------------------------


class RepVGGStyle(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1, dilation=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, dilation, groups, dilation)
        self.point = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "groups", "dilation"),
    [(4, 4, 1, 1, 1), (3, 7, 2, 1, 1), (6, 6, 1, 3, 1), (6, 6, 1, 6, 1), (5, 5, 1, 1, 2), (6, 9, 2, 3, 1)],
)
def test_repvgg_style_block_becomes_one_conv(cin, cout, stride, groups, dilation):
    x = torch.randn(2, cin, 9, 10)
    gm, log = folded(RepVGGStyle(cin, cout, stride, groups, dilation), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    conv = only_conv(gm)
    assert conv.groups == groups, "folding must keep the groups (depthwise stays depthwise)"
    assert conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
    assert len(log.regions) == 1 and "dense.0" in ", ".join(log.regions[0].members)


class ACNetStyle(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


@pytest.mark.parametrize("stride", [1, 2])
def test_acnet_style_asymmetric_branches(stride):
    x = torch.randn(2, 5, 8, 11)
    gm, _ = folded(ACNetStyle(5, 7, stride), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0


class DBBStyle(nn.Module):
    """Diverse branch block in plain torch: the 1x1 pads first (BN-and-pad) so every branch is exact."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, stride, 1)
        self.point = conv_bn(cin, cout, 1, stride)
        self.one_k = nn.Sequential(conv_bn(cin, cin, 1, 1, 1), conv_bn(cin, cout, 3, stride, 0))
        self.pool = nn.Sequential(conv_bn(cin, cout, 1, 1, 1), nn.AvgPool2d(3, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.square(x) + self.point(x) + self.one_k(x) + self.pool(x))


@pytest.mark.parametrize("stride", [1, 2])
def test_dbb_style_sequential_and_avg_pool_branches(stride):
    x = torch.randn(2, 4, 10, 9)
    gm, log = folded(DBBStyle(4, 6, stride), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    assert count_aten_ops(gm, x.double())["avg_pool2d"] == 0
    assert len(log.regions[0].members) >= 12


class MobileOneStyle(nn.Module):
    def __init__(self, channels, k, depthwise):
        super().__init__()
        groups = channels if depthwise else 1
        kernel = 3 if depthwise else 1
        self.branches = nn.ModuleList(conv_bn(channels, channels, kernel, 1, kernel // 2, groups) for _ in range(k))
        self.scale = conv_bn(channels, channels, 1, 1, 0, groups) if depthwise else None
        self.skip = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.skip(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.branches:
            out = out + branch(x)
        return F.relu(out)


@pytest.mark.parametrize("depthwise", [True, False])
def test_mobileone_style_over_parameterised_branches(depthwise):
    x = torch.randn(2, 6, 8, 8)
    gm, _ = folded(MobileOneStyle(6, 3, depthwise), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    assert only_conv(gm).groups == (6 if depthwise else 1)


# --- Conv-BN-ReLU stacks ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_resnet_stack_keeps_one_conv_per_conv_and_no_batch_norm():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 8, 1), BasicBlock(8, 12, 2)
    )
    x = torch.randn(2, 3, 12, 12)
    gm, _ = folded(model, x)
    assert convs(gm, x) == 6 and bns(gm, x) == 0


class InvertedResidual(nn.Module):
    def __init__(self, channels, expand):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(conv_bn(channels, hidden, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(conv_bn(hidden, hidden, 3, 1, 1, hidden), nn.ReLU6())
        self.project = conv_bn(hidden, channels, 1)

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


def test_mobilenet_inverted_residual_keeps_depthwise():
    x = torch.randn(2, 5, 8, 8)
    gm, _ = folded(InvertedResidual(5, 3), x)
    assert convs(gm, x) == 3 and bns(gm, x) == 0
    assert sorted(m.groups for m in gm.modules() if isinstance(m, nn.Conv2d)) == [1, 1, 15]


def test_depthwise_then_pointwise_is_not_merged_into_a_bigger_dense_conv():
    model = nn.Sequential(conv_bn(8, 8, 3, 1, 1, groups=8), conv_bn(8, 16, 1))
    x = torch.randn(1, 8, 7, 7)
    gm, log = folded(model, x)
    assert convs(gm, x) == 2 and bns(gm, x) == 0
    assert sorted(m.groups for m in gm.modules() if isinstance(m, nn.Conv2d)) == [1, 8]
    assert any("multiply-adds" in line for line in log.kept)


def test_pointwise_into_dense_conv_merges_only_when_it_saves_work():
    x = torch.randn(1, 4, 7, 7)
    gm, _ = folded(nn.Sequential(conv_bn(4, 6, 1), conv_bn(6, 5, 3)), x)  # 4 inputs instead of 6: cheaper
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    gm, log = folded(nn.Sequential(conv_bn(4, 2, 1), conv_bn(2, 5, 3)), x)  # a bottleneck: merging costs more
    assert convs(gm, x) == 2 and bns(gm, x) == 0 and any("multiply-adds" in line for line in log.kept)


# --- MLP, functional calls, model-zoo idioms -----------------------------------------------------


def test_mlp_linear_batchnorm1d_dropout():
    model = nn.Sequential(
        nn.Linear(7, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Dropout(0.3),
        nn.BatchNorm1d(9), nn.Linear(9, 3),
    )  # fmt: skip
    x = torch.randn(4, 7)
    gm, log = folded(model, x)
    ops = count_aten_ops(gm, x.double())
    assert ops["addmm"] == 2 and bns(gm, x) == 0 and ops["dropout"] == 0
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm1d)) for m in gm.modules())
    assert log.dropped == ["3 (Dropout)"]


class Functional(nn.Module):
    """F.conv2d / F.batch_norm on parameters, a layer-scale parameter, torch.add and sum([...])."""

    def __init__(self, c):
        super().__init__()
        self.w3, self.w1 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2), nn.Parameter(torch.randn(c, c, 1, 1))
        self.bn3, self.bn1, self.bn_id = nn.BatchNorm2d(c), nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    @staticmethod
    def bn(x, bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)

    def forward(self, x):
        a = self.bn(F.conv2d(x, self.w3, padding=1), self.bn3)
        b = self.bn(F.conv2d(x, self.w1), self.bn1)
        y = sum([a, b, self.bn(x, self.bn_id)])
        return F.relu(torch.add(x, self.gamma * y))


def test_functional_calls_layer_scale_and_sum_of_branches():
    x = torch.randn(2, 4, 6, 6)
    gm, _ = folded(Functional(4), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    assert count_aten_ops(gm, x.double())["mul"] == 0


class BNAct(nn.BatchNorm2d):
    """timm-style BatchNorm with an activation that is the identity here."""

    def __init__(self, c, act=nn.Identity):
        super().__init__(c)
        self.act = act()

    def forward(self, x):
        return self.act(super().forward(x))


class PlainBN(nn.BatchNorm2d):
    pass


class StdConv(nn.Conv2d):
    """Weight-standardised conv: its weight is computed from a parameter at every call."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_batch_norm_subclasses_sync_batch_norm_and_computed_weights_fold():
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), BNAct(5), nn.ReLU(),
        StdConv(5, 6, 3, padding=1), PlainBN(6), nn.ReLU(),
        nn.Conv2d(6, 6, 1), BNAct(6, nn.ReLU),
        nn.Conv2d(6, 3, 3), nn.SyncBatchNorm(3),
    )  # fmt: skip
    x = torch.randn(2, 3, 7, 7)
    gm, _ = folded(model, x)
    assert convs(gm, x) == 4 and bns(gm, x) == 0
    assert count_aten_ops(gm, x.double())["relu"] == 3


class SharedReflectConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))


def test_reflect_padded_conv_still_absorbs_its_batch_norm_also_when_shared():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(1, 3, 6, 6)
    gm, _ = folded(model, x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0
    gm, _ = folded(SharedReflectConv(), x)
    assert convs(gm, x) == 2 and bns(gm, x) == 0


class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, 4, 3, 1, 1)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Flatten())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        features = F.relu(self.body(x))
        logits = self.head(features.mean((2, 3)))
        if self.training:
            return logits, self.aux(features)
        return {"logits": logits, "features": features}


def test_training_only_heads_vanish_and_dict_outputs_survive():
    x = torch.randn(2, 3, 6, 6)
    gm, _ = folded(AuxHead(), x)
    assert set(gm(x.double())) == {"logits", "features"}
    assert not any(key.startswith("aux") for key in gm.state_dict())
    assert convs(gm, x) == 1


# --- where folding would not be exact -------------------------------------------------------------


def test_bias_meeting_zero_padding_is_not_folded_and_says_why():
    model = nn.Sequential(conv_bn(4, 4, 1), conv_bn(4, 5, 3, 1, 1))
    x = torch.randn(1, 4, 6, 6)
    gm, log = folded(model, x)
    assert convs(gm, x) == 2 and bns(gm, x) == 0
    assert any("zero padding" in line for line in log.kept)


def test_batch_norm_alone_between_non_linearities_stays_a_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(1, 3, 6, 6)
    gm, log = folded(model, x)
    assert bns(gm, x) == 1 and not log.regions


def test_batch_norm_without_running_stats_and_exclusive_avg_pool_are_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 4, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
    )  # fmt: skip
    x = torch.randn(2, 3, 6, 6)
    gm, log = folded(model, x)
    assert bns(gm, x) == 1 and convs(gm, x) == 2
    assert any("track_running_stats" in line for line in log.kept)
    assert any("count_include_pad" in line for line in log.kept)


# --- fallback -------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = RepVGGStyle(4, 4)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = x * 2
        return self.b(x)


def test_untraceable_model_folds_its_children_and_says_so():
    x = torch.randn(2, 3, 6, 6)
    gm, log = folded(DataDependent(), x)
    assert convs(gm, x) == 2 and bns(gm, x) == 0
    assert log.fallbacks and "model: not traceable" in log.fallbacks[0]


def test_folded_graph_scripts_and_exports():
    model = nn.Sequential(
        RepVGGStyle(3, 4, 2), RepVGGStyle(4, 4), nn.Flatten(), nn.Linear(4 * 16, 3), nn.BatchNorm1d(3)
    )
    x = torch.randn(2, 3, 8, 8)
    gm, _ = folded(model, x)
    scripted = torch.jit.script(gm)
    assert_close(scripted(x.double()), gm(x.double()))
    exported = torch.export.export(gm, (x.double(),))
    assert_close(exported.module()(x.double()), gm(x.double()))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > -100 else -x  # data-dependent control flow


class GatedSequential(nn.Sequential):
    """A Sequential whose own forward has data-dependent control flow."""

    def forward(self, x):
        for layer in self:
            x = layer(x) if x.mean() > -100 else x
        return x


def test_untraceable_sequential_fuses_adjacent_conv_and_linear_batch_norm_pairs():
    model = GatedSequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Gate(),
        nn.Flatten(), nn.Linear(4 * 25, 5), nn.BatchNorm1d(5),
    )  # fmt: skip
    x = torch.randn(2, 3, 5, 5)
    gm, log = folded(model, x)
    assert bns(gm, x) == 0 and convs(gm, x) == 1
    assert [r.name for r in log.regions] == ["0", "5"]
    assert log.fallbacks[0].startswith("model: not traceable") and log.fallbacks[1].startswith("3: not traceable")


def test_untraceable_module_in_a_sequential_stays_opaque_and_the_sequential_folds_around_it():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Gate(),
        nn.Flatten(), nn.Linear(4 * 25, 5), nn.BatchNorm1d(5),
    )  # fmt: skip
    x = torch.randn(2, 3, 5, 5)
    gm, log = folded(model, x)
    assert bns(gm, x) == 0 and convs(gm, x) == 1
    assert [r.members for r in log.regions] == [["0", "1"], ["5", "6"]]
    assert any(item.startswith("3: not traceable by torch.fx (TraceError") for item in log.kept), log.kept
    assert log.fallbacks == ["3: not traceable (TraceError: symbolically traced variables cannot be used as "
                             "inputs to control flow); folded its children separately"]  # fmt: skip


def test_algebra_aligns_the_dilation_of_pointwise_branches():
    from trainfer.reparam import algebra

    dilated = algebra.ConvOp(torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                             padding=(2, 2), dilation=(2, 2))  # fmt: skip
    point = algebra.ConvOp(torch.randn(4, 4, 1, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    aligned = algebra.align_pointwise_dilation([dilated, point])
    assert aligned[1].dilation == (2, 2) and aligned[0].dilation == (2, 2)
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    assert_close(algebra.add([dilated, point])(x), dilated(x) + point(x))
    dilated_point = algebra.ConvOp(point.weight, point.bias, dilation=(2, 2))  # no taps anywhere: dilation moot
    assert_close(algebra.add([dilated_point, point])(x), 2 * point(x))


class ItemScaled(nn.Module):
    """``.item()`` in the graph: fake tensors cannot propagate it, real shape propagation takes over."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, 4, 3, 1, 1)

    def forward(self, x):
        y = self.body(x)
        return y / (1.0 + y.abs().max().item())


def test_graph_with_data_dependent_scalars_still_folds():
    x = torch.randn(2, 3, 6, 6)
    gm, _ = folded(ItemScaled(), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0


class InputConditioned(nn.Module):
    """BatchNorm whose affine weight, and a conv whose bias, are computed from the input: not constants."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(3, 4)
        self.mix = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        gamma = self.fc(x.mean((2, 3))).mean(0)
        y = F.batch_norm(self.conv(x), self.bn.running_mean, self.bn.running_var, gamma, None, False)
        return F.conv2d(y, self.mix.weight, gamma)


def test_parameters_computed_from_the_input_are_not_folded():
    x = torch.randn(2, 3, 7, 7)
    gm, log = folded(InputConditioned(), x)
    assert bns(gm, x) == 1 and not log.regions


class ShapeDependentPad(nn.Module):
    """Pad and pool sizes computed from the input's shape are graph values, not constants."""

    def __init__(self):
        super().__init__()
        self.body = conv_bn(3, 3, 1)

    def forward(self, x):
        p = x.shape[-1] // 4
        return F.avg_pool2d(F.pad(self.body(x), [p, p, p, p]), p + 1, 1)


def test_shape_dependent_pad_and_pool_stay_and_the_rest_folds():
    x = torch.randn(1, 3, 8, 8)
    gm, log = folded(ShapeDependentPad(), x)
    assert convs(gm, x) == 1 and bns(gm, x) == 0 and [r.members for r in log.regions] == [["body.0", "body.1"]]
