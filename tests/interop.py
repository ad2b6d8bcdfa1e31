"""What the interop suites (``tests/test_interop_*.py``, ``make test-interop``) check on every model.

The models and the measurements live in ``benchmarks/bench_interop.py`` (the docs table is its
output); each test runs one model there, in a forked process under a time limit, so a hang fails
that test only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

LIMIT_S = 600


def _load() -> Any:
    name = "bench_interop"
    if name not in sys.modules:
        path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


bench = _load()


def deploy_checked(name: str, protocols: bool = True) -> Any:
    """Deploy ``name`` and assert what holds for every model: no raise, exact in float64 (1e-9) and in
    the model's dtype, outputs of the eval form's types, no more BatchNorm or convolution kernels than
    the eval form or the library's own converter. Returns the row for model-specific checks."""
    row = bench.run(name, protocols, timeout=LIMIT_S)
    assert not row.error, row.error
    assert row.ok and row.max_rel_error_float64 <= 1e-9, row
    assert row.same_types, row
    eval_bn, deploy_bn, own_bn = row.batch_norms
    eval_conv, deploy_conv, own_conv = row.convolutions
    assert deploy_bn <= eval_bn and deploy_conv <= eval_conv, row
    if own_bn >= 0:
        assert deploy_bn <= own_bn and deploy_conv <= own_conv, row
    return row
