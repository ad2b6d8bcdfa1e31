"""Blocks' own conversions (``switch_to_deploy()``/``reparameterize()``/``fuse()``), written as the
model zoos write them (no trainfer imports in the blocks), each checked on its own module.

* ``DBBStyle``: the DiverseBranchBlock official repository's conversion: the average-pool kernel
  comes from ``torch.zeros`` (the default dtype: float32 unless deploy sets it), a new
  ``dbb_reparam`` conv replaces the branches and ``nonlinear`` keeps its name while reading another
  input. ``DBBNumpy32`` builds that kernel as a numpy float32 array (as RepVGG's and ACNet's
  repositories build theirs): ``1/9`` is rounded whatever torch's default dtype.
* ``ConvNorm``: timm's LeViT/RepViT convention: ``fuse()`` returns a new ``nn.Conv2d`` (default
  dtype) filled with ``weight.data.copy_``; ``Float32ConvNorm`` builds it as float32 explicitly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainfer
from trainfer.blocks import RepVGGBlock
from trainfer.reparam.fold import fold
from trainfer.reparam.protocols import apply_protocols
from trainfer.testing import assert_close, batch_norm_calls, count_aten_ops, randomize_batchnorm


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed weights and inputs: whether a float32 constant shows above a tolerance must not be luck."""
    torch.manual_seed(0)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout))


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def trans_v_avg(channels: int, kernel_size: int) -> torch.Tensor:
    """DBB's ``transV_avg``: the average pool as a conv kernel, built in the default dtype (float32)."""
    k = torch.zeros((channels, channels, kernel_size, kernel_size))
    k[torch.arange(channels), torch.arange(channels), :, :] = 1.0 / kernel_size**2
    return k


class DBBStyle(nn.Module):
    """kxk conv-BN + 1x1 conv-BN + (1x1 conv -> avg pool -> BN), then ReLU, as DBB's repository has it."""

    avg_kernel = staticmethod(trans_v_avg)

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        self.k, self.stride = k, stride
        self.dbb_origin = conv_bn(cin, cout, k, stride, k // 2)
        self.dbb_1x1 = conv_bn(cin, cout, 1, stride)
        avg = OrderedDict(conv=nn.Conv2d(cin, cout, 1, bias=False), avg=nn.AvgPool2d(k, stride, k // 2))
        self.dbb_avg = nn.Sequential(OrderedDict(**avg, avgbn=nn.BatchNorm2d(cout)))
        self.nonlinear = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(x))
        return self.nonlinear(self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x))

    def switch_to_deploy(self):
        k_origin, b_origin = fuse_bn(self.dbb_origin[0].weight, self.dbb_origin[1])
        k_1x1, b_1x1 = fuse_bn(self.dbb_1x1[0].weight, self.dbb_1x1[1])
        first = self.dbb_avg.conv.weight
        k_avg, b_avg = fuse_bn(self.avg_kernel(first.shape[0], self.k).to(first.device), self.dbb_avg.avgbn)
        k_avg = F.conv2d(k_avg, first.permute(1, 0, 2, 3))  # DBB's transIII_1x1_kxk
        pad = [self.k // 2] * 4
        kernel, bias = k_origin + F.pad(k_1x1, pad) + k_avg, b_origin + b_1x1 + b_avg
        self.dbb_reparam = nn.Conv2d(first.shape[1], first.shape[0], self.k, self.stride, self.k // 2, bias=True)
        self.dbb_reparam.weight.data = kernel
        self.dbb_reparam.bias.data = bias
        for name in ("dbb_origin", "dbb_1x1", "dbb_avg"):
            self.__delattr__(name)


def numpy32_avg(channels: int, kernel_size: int) -> torch.Tensor:
    k = np.zeros((channels, channels, kernel_size, kernel_size), dtype=np.float32)
    k[np.arange(channels), np.arange(channels), :, :] = 1.0 / kernel_size**2
    return torch.from_numpy(k)


class DBBNumpy32(DBBStyle):
    avg_kernel = staticmethod(numpy32_avg)


class ConvNorm(nn.Sequential):
    """timm's ``ConvNorm``: ``fuse()`` returns a new conv (default dtype) filled by ``copy_``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def _fused(self, **dtype) -> nn.Conv2d:
        c, bn = self._modules.values()
        w, b = fuse_bn(c.weight, bn)
        m = nn.Conv2d(w.size(1), w.size(0), w.shape[2:], stride=c.stride, padding=c.padding, **dtype)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m

    @torch.no_grad()
    def fuse(self):
        return self._fused()


class Float32ConvNorm(ConvNorm):
    @torch.no_grad()
    def fuse(self):
        return self._fused(dtype=torch.float32)


def head_model(block: nn.Module, channels: int, seed: int = 0) -> nn.Module:
    """``block`` then a 1x1 conv and BatchNorm: the divergence locator has later modules to blame."""
    return randomize_batchnorm(nn.Sequential(block, nn.Conv2d(channels, 4, 1), nn.BatchNorm2d(4)), seed).eval()


# --- the per-module check ---------------------------------------------------------------------------


def dbb_model(cls: type[DBBStyle], cin: int = 3, cout: int = 8, k: int = 3, stride: int = 1) -> nn.Module:
    return head_model(cls(cin, cout, k, stride), cout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "stride", "cin", "cout"), [(3, 1, 3, 8), (5, 2, 5, 6), (3, 2, 4, 4)])
def test_dbb_conversion_builds_its_constants_in_float64(dtype, k, stride, cin, cout):
    """torch.zeros in switch_to_deploy() made a float32 kernel: EquivalenceError (1e-8 > 1e-9) before."""
    model = dbb_model(DBBStyle, cin, cout, k, stride).to(dtype)
    x = torch.randn(2, cin, 11, 11, dtype=dtype)
    deployed = trainfer.deploy(model, x)
    report = deployed.trainfer_report
    assert report.protocols == ["0.switch_to_deploy()"] and report.protocols_rejected == []
    assert report.verification["float64"].max_rel_error <= 1e-9
    with torch.no_grad():
        assert_close(deployed(x), model(x))
    assert count_aten_ops(deployed, x)["convolution"] == 2 and batch_norm_calls(deployed, x) == 0
    assert not hasattr(model[0], "dbb_reparam") and torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("k", "stride", "cin", "cout"), [(3, 1, 3, 8), (5, 2, 5, 6), (3, 2, 4, 4)])
def test_conversion_with_float32_constants_is_undone_and_folded_exactly(dtype, k, stride, cin, cout):
    model = dbb_model(DBBNumpy32, cin, cout, k, stride).to(dtype)
    x = torch.randn(2, cin, 11, 11, dtype=dtype)
    deployed = trainfer.deploy(model, x)
    report = deployed.trainfer_report
    assert report.protocols == [] and len(report.protocols_rejected) == 1
    assert report.protocols_rejected[0].startswith("0.switch_to_deploy(): not exact in float64")
    assert "trainfer folded the original instead" in report.protocols_rejected[0]
    assert report.verification["float64"].max_rel_error <= 1e-9
    with torch.no_grad():
        assert_close(deployed(x), model(x))
    assert count_aten_ops(deployed, x)["convolution"] == 2 and batch_norm_calls(deployed, x) == 0


def test_trusted_inexact_protocol_is_named_as_the_divergence():
    """DBB keeps the name ``0.nonlinear`` for a ReLU reading the new conv: the locator must blame block 0."""
    model = dbb_model(DBBNumpy32, k=5)  # float32(1/25) is 2.2e-8 off (float32(1/9): 3e-9)
    with torch.no_grad():  # the average-pool branch dominates: its float32 kernel shows at the output
        model[0].dbb_origin[1].weight.zero_()
        model[0].dbb_1x1[1].weight.zero_()
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(trainfer.EquivalenceError) as caught:
        trainfer.deploy(model, x, protocols="trust")
    report = caught.value.report
    assert report.verification["float64"].divergence == "0"
    assert "module '0' (0.switch_to_deploy(): not exact in float64" in str(caught.value)
    assert report.verification["float32"].ok  # float32-exact, as its authors intended


def test_divergence_locator_never_pairs_names_inside_a_converted_module():
    reference = dbb_model(DBBNumpy32).double().eval()
    candidate = copy.deepcopy(reference)
    candidate[0].switch_to_deploy()  # float32 avg kernel: 0.nonlinear now differs by ~1e-9
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    blind = trainfer.verify(reference, candidate, x, dtypes=(torch.float64,), rtol=1e-11)
    assert blind.divergence == "0.nonlinear"  # a reused name: the ReLU is not what went wrong
    aware = trainfer.verify(reference, candidate, x, dtypes=(torch.float64,), rtol=1e-11, opaque=["0"])
    assert aware.divergence == "0"


def test_nested_protocols_fall_back_to_the_exact_inner_ones():
    class Stage(nn.Module):
        """An outer ``switch_to_deploy`` that converts its blocks: inexact because of the DBB block."""

        def __init__(self):
            super().__init__()
            self.dbb = DBBNumpy32(4, 4)
            self.rep = RepVGGBlock(4, 4)

        def switch_to_deploy(self):
            self.dbb.switch_to_deploy()
            self.rep.reparameterize()

        def forward(self, x):
            return self.rep(self.dbb(x))

    model = randomize_batchnorm(nn.Sequential(Stage(), nn.Conv2d(4, 2, 1)))
    x = torch.randn(1, 4, 8, 8)
    deployed = trainfer.deploy(model, x)
    report = deployed.trainfer_report
    assert report.protocols == ["0.rep.reparameterize()"]
    assert [line.split(":")[0] for line in report.protocols_rejected] == [
        "0.switch_to_deploy()",
        "0.dbb.switch_to_deploy()",
    ]
    assert batch_norm_calls(deployed, x) == 0


def test_a_protocol_that_raises_is_undone_and_reported():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = conv_bn(3, 4, 3, 1, 1)

        def reparameterize(self):
            self.branch = None  # half-converted when it fails: must be restored
            raise RuntimeError("checkpoint lacks the fused weights")

        def forward(self, x):
            return self.branch(x)

    model = randomize_batchnorm(nn.Sequential(Broken(), nn.ReLU()))
    x = torch.randn(1, 3, 6, 6)
    deployed = trainfer.deploy(model, x)
    report = deployed.trainfer_report
    assert report.protocols_rejected == [
        "0.reparameterize(): raised RuntimeError: checkpoint lacks the fused weights; left to trainfer's folder"
    ]
    assert batch_norm_calls(deployed, x) == 0 and count_aten_ops(deployed, x)["convolution"] == 1


def test_protocol_of_a_module_that_never_runs_is_kept_unchecked():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 3, 1)
            self.aux = ConvNorm(3, 3)

        def forward(self, x):
            return self.used(x)

    model = randomize_batchnorm(Unused())
    converted, log = apply_protocols(model, (torch.randn(1, 3, 4, 4),))
    assert [str(call) for call in log.calls] == ["aux.fuse(): not run on the example inputs, unchecked"]
    assert isinstance(converted.aux, nn.Conv2d)


# --- timm's convention: fuse() returns a new module --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_returning_a_new_module_replaces_it_in_its_parent(dtype):
    model = head_model(ConvNorm(3, 8), 8).to(dtype)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    deployed = trainfer.deploy(model, x)  # raised TypeError "...returned a new module" before
    assert deployed.trainfer_report.protocols == ["0.fuse()"]
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9
    with torch.no_grad():
        assert_close(deployed(x), model(x))
    assert batch_norm_calls(deployed, x) == 0


def test_fuse_of_the_root_returns_the_new_root():
    model = randomize_batchnorm(ConvNorm(3, 4)).double().eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    converted, log = apply_protocols(copy.deepcopy(model), (x,))
    assert type(converted) is nn.Conv2d and [c.call for c in log.kept] == ["model.fuse()"]
    assert converted.weight.dtype == torch.float64
    with torch.no_grad():
        assert_close(converted(x), model(x))


def test_float32_module_built_by_fuse_is_cast_and_then_judged(capfd):
    """A fuse() building a float32 layer left it in the float64 fold: cast, check, undo (inexact), fold."""
    model = head_model(Float32ConvNorm(3, 8), 8)
    x = torch.randn(2, 3, 7, 7)
    deployed = trainfer.deploy(model, x)
    assert deployed.trainfer_report.protocols_rejected[0].startswith("0.fuse(): not exact in float64")
    assert batch_norm_calls(deployed, x) == 0
    with pytest.raises(trainfer.EquivalenceError, match=r"module '0' \(0\.fuse\(\): not exact"):
        trainfer.deploy(model, x, protocols="trust")  # was "Input type (double) and bias type (float)"
    assert "Traceback" not in capfd.readouterr().err


# --- visiting order and signatures ------------------------------------------------------------------


class WithProtocol(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.branch = conv_bn(3, 3, 3, 1, 1)
        self.calls = 0
        setattr(self, method, self._convert)

    def _convert(self):
        self.calls += 1
        self.branch = nn.Sequential(self.branch[0], nn.Identity())  # a deliberately visible conversion

    def forward(self, x):
        return self.branch(x)


@pytest.mark.parametrize("method", ["reparameterize", "switch_to_deploy", "fuse"])
def test_protocols_are_called_once_on_the_outermost_module(method):
    inner = WithProtocol(method)
    outer = nn.Sequential(inner, WithProtocol("fuse"))
    assert [c.call for c in apply_protocols(outer)[1].calls] == [f"0.{method}()", "1.fuse()"]
    assert inner.calls == 1 and isinstance(inner.branch[1], nn.Identity)
    root = WithProtocol(method)
    root.child = WithProtocol("fuse")
    assert [c.call for c in apply_protocols(root)[1].calls] == [f"model.{method}()"] and root.child.calls == 0


def test_a_conversion_that_changes_the_function_is_undone():
    model = randomize_batchnorm(WithProtocol("fuse")).double().eval()  # its "conversion" drops the BN
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    converted, log = apply_protocols(model, (x,))
    assert not log.kept and "not exact in float64" in str(log.rejected[0])
    assert isinstance(converted.branch[1], nn.BatchNorm2d)


def test_protocol_with_required_arguments_is_not_called():
    class NeedsArgument(nn.Module):
        def fuse(self, other):
            raise AssertionError("must not be called")

    assert apply_protocols(NeedsArgument())[1].calls == []


def test_deploy_refuses_an_unknown_protocols_option():
    with pytest.raises(ValueError, match="protocols must be True, False or 'trust'; got 'yes'"):
        trainfer.deploy(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), protocols="yes")


def test_shape_propagation_failure_prints_no_traceback(capfd):
    conv = nn.Conv2d(3, 4, 3).double()
    conv.bias.data = conv.bias.data.float()  # what a protocol's fresh float32 layer used to leave behind
    model = nn.Sequential(conv, nn.BatchNorm2d(4).double()).eval()
    with pytest.raises(RuntimeError, match="bias type \\(float\\) should be the same"):
        fold(model, (torch.randn(1, 3, 5, 5, dtype=torch.float64),))
    assert "Traceback" not in capfd.readouterr().err


def test_verification_on_smaller_inputs_than_the_example():
    model = dbb_model(DBBNumpy32)
    deployed = trainfer.deploy(model, torch.randn(1, 3, 32, 32), verify_inputs=torch.randn(2, 3, 9, 9))
    equivalence = deployed.trainfer_report.verification["float64"]
    assert equivalence.ok and equivalence.inputs_checked == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(deployed(x), model(x))
