"""deploy() on a model whose forward has default and keyword-only arguments: defaults are used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainfer
from trainfer.testing import assert_close, batch_norm_calls, randomize_batchnorm


class Defaults(nn.Module):
    """conv -> BN, scaled by ``scale``, shifted by ``shift`` when one is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x, scale=1.5, *, shift=None):
        y = self.bn(self.conv(x)) * scale
        return y if shift is None else y + shift


def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(Defaults(), seed=0).double().eval()


def test_defaults_are_used_and_the_fold_is_exact(capfd):
    source = model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    deployed = trainfer.deploy(source, x)
    assert_close(deployed(x), source(x))  # float64 tolerance
    assert batch_norm_calls(deployed, x) == 0
    assert batch_norm_calls(source, x) == 1
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err  # library code prints no tracebacks


def test_a_value_other_than_the_folded_default_is_refused():
    deployed = trainfer.deploy(model(), torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(AssertionError, match="scale has been specialized"):
        deployed(torch.randn(1, 3, 8, 8, dtype=torch.float64), 2.0)


class DataDependent(Defaults):
    """Scaled by a value read from the input (``.item()``): fake tensors cannot propagate it."""

    def forward(self, x, scale=1.5, *, shift=None):
        return super().forward(x, scale, shift=shift) * x.abs().amax().item()


def test_shapes_of_graphs_fake_tensors_cannot_run_are_recorded_quietly(capfd):
    torch.manual_seed(1)
    source = randomize_batchnorm(DataDependent(), seed=1).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    deployed = trainfer.deploy(source, x)
    assert_close(deployed(x), source(x))
    assert batch_norm_calls(deployed, x) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
