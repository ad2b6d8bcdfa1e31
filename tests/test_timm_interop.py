"""deploy on timm's architectures (optional: skipped without timm; ``make test-timm`` runs it).

Random weights, random non-trivial BatchNorm statistics, a 1x3x64x64 input: every model must
deploy exactly (float64 within 1e-9, float32 within 1e-5, the proof ``deploy`` itself runs) and
execute no more BatchNorm kernels than timm's own ``reparameterize_model`` leaves. Each model runs
in a forked process under a time limit (``benchmarks/bench_timm.py``), so a hang fails its test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import trainfer
from trainfer.testing import batch_norm_calls, randomize_batchnorm

timm = pytest.importorskip("timm")


def _bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_timm.py"
    spec = importlib.util.spec_from_file_location("bench_timm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()
SIZE, LIMIT_S = 64, 600


@pytest.mark.parametrize("name", bench.REPARAM_MODELS + bench.BN_CNNS)
def test_deploy_is_exact_and_leaves_no_more_batch_norm_than_timm(name):
    row = bench.run_isolated(bench.compare, (name, SIZE), LIMIT_S)
    assert not row.error, row.error
    assert row.ok and row.max_rel_error_float64 <= 1e-9
    assert row.batch_norms_deploy <= row.batch_norms_timm, row


def test_timm_fuse_returning_a_new_module_is_accepted():
    """timm's own ConvNorm: ``fuse()`` returns a new conv (timm sets it into the parent)."""
    from timm.models.levit import ConvNorm

    model = randomize_batchnorm(nn.Sequential(ConvNorm(3, 8, 3, 1, 1), nn.Hardswish(), ConvNorm(8, 4, 1))).eval()
    x = torch.randn(1, 3, 16, 16)
    deployed = trainfer.deploy(model, x)
    assert deployed.trainfer_report.protocols == ["0.fuse()", "2.fuse()"]
    assert deployed.trainfer_report.verification["float64"].max_rel_error <= 1e-9
    assert batch_norm_calls(deployed, x) == 0
