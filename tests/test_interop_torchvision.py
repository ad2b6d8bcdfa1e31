"""deploy on torchvision's classification, segmentation and detection models (optional: skipped
without torchvision; ``make test-interop`` runs it in ``.venv-next``).

Random weights and BatchNorm statistics, small inputs; checks common to every model in
``tests/interop.py``: no raise, exact in float64 and float32, the eval output's types, no more
BatchNorm or convolution kernels than the eval form.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")

from interop import bench, deploy_checked  # noqa: E402 - only once torchvision is known to be there

CLASSIFIERS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "googlenet", "inception_v3"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_deploy_exactly_with_every_batch_norm_folded(name):
    row = deploy_checked(name)
    assert row.batch_norms[1] == 0, row


def test_densenet_keeps_only_its_pre_activation_batch_norms():
    """DenseNet normalises the concatenation of earlier features (``norm1`` of each layer, the
    transitions' ``norm``, ``norm5``) before a ReLU: no conv computes that value alone (the
    features are concatenated unnormalised elsewhere), so those stay; every ``norm2`` (after
    ``conv1``) folds."""
    from torch import nn

    row = deploy_checked("densenet121")
    model = bench.build("densenet121").model
    pre_activation = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not name.endswith(("norm2", "features.norm0"))
    ]
    assert row.batch_norms[1] == len(pre_activation), row


def test_deeplabv3_keeps_its_ordered_dict_output_and_folds_every_batch_norm():
    row = deploy_checked("deeplabv3_mobilenet_v3_large")
    assert row.batch_norms[1] == 0, row


def test_faster_rcnn_takes_its_list_of_images_and_verifies_its_detections():
    """``model([image])``; with ``box_score_thresh=0`` it returns detections (not an empty list),
    whose model-dtype check follows near-tied selections (NMS, top-k)."""
    row = deploy_checked("fasterrcnn_mobilenet_v3_large_320_fpn")
    assert row.batch_norms[1] == 0, row
