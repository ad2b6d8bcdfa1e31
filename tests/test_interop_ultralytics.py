"""deploy on Ultralytics models built from their yaml (optional: skipped without ultralytics;
``make test-interop`` runs it in ``.venv-next``). No download, random weights.

With protocols on, deploy calls the model's own ``fuse()`` (quietly) where it is exact; with
protocols off, the folder alone must fold every BatchNorm: no more BatchNorm or convolution
kernels than Ultralytics' ``fuse()`` either way. Common checks in ``tests/interop.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ultralytics")

from interop import deploy_checked  # noqa: E402 - only once ultralytics is known to be there


@pytest.mark.parametrize("protocols", [True, False], ids=["protocols", "folder-only"])
@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolov8n-cls", "rtdetr-l"])
def test_models_deploy_exactly_with_every_batch_norm_folded(name, protocols):
    row = deploy_checked(name, protocols)
    assert row.batch_norms[1] == 0, row
