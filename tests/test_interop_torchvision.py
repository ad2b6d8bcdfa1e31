"""deploy on torchvision's classification, segmentation and detection models (optional: skipped
without torchvision; ``make test-interop`` runs it in ``.venv-next``).

Random weights and BatchNorm statistics, small inputs; checks common to every model in
``tests/interop.py``: no raise, exact in float64 and float32, the eval output's types, no more
BatchNorm or convolution kernels than the eval form.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchvision")

from interop import deploy_checked  # noqa: E402 - only once torchvision is known to be there

CLASSIFIERS = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "googlenet",
    "inception_v3",
    "densenet121",
]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_deploy_exactly_with_every_batch_norm_folded(name):
    row = deploy_checked(name)
    assert row.batch_norms[1] == 0, row


def test_deeplabv3_keeps_its_ordered_dict_output_and_folds_every_batch_norm():
    row = deploy_checked("deeplabv3_mobilenet_v3_large")
    assert row.batch_norms[1] == 0, row


def test_faster_rcnn_takes_its_list_of_images_and_verifies_its_detections():
    """``model([image])``; with ``box_score_thresh=0`` it returns detections (not an empty list),
    whose model-dtype check follows near-tied selections (NMS, top-k)."""
    row = deploy_checked("fasterrcnn_mobilenet_v3_large_320_fpn")
    assert row.batch_norms[1] == 0, row
