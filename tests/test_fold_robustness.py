"""``deploy`` on models nobody here wrote: it terminates, folds around what fx cannot trace, keeps
exact models exact, and folds the batch-norm part of BatchNorm subclasses (issue 14).

Every deploy runs under a wall-clock limit (a hang fails the test), on random non-trivial
BatchNorm statistics, in float64 (1e-9) and float32 (1e-5); what the deployed form executes is
counted with ``count_aten_ops``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from time_limit import time_limit
from torch import Tensor, nn

import trainfer
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
