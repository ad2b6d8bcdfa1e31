"""``digits_net``: a small re-parameterizable classifier for 8x8 grayscale digits (N x 1 x 8 x 8)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from trainfer.modes.dual import DualModule, train_only
from trainfer.recipe import ModelRecipe, attach_recipe
from trainfer.reparam.blocks import DiverseBranchBlock, RepVGGBlock


class DigitsNet(DualModule):
    """RepVGG stem (8x8) - DBB block - RepVGG stride-2 block (4x4) - DBB block - pool - dropout - linear.

    In training an auxiliary head on the 8x8 features adds deep supervision:
    ``forward_train`` returns ``{"logits", "aux_logits"}``; ``forward_infer`` returns the logits
    tensor, and never touches the auxiliary head (wrapped in :func:`trainfer.train_only`).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.2, *, deploy: bool = False) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            RepVGGBlock(1, width, act_layer=nn.ReLU, deploy=deploy),
            DiverseBranchBlock(width, width, act_layer=nn.ReLU, deploy=deploy),
        )
        self.stage2 = nn.Sequential(
            RepVGGBlock(width, 2 * width, stride=2, act_layer=nn.ReLU, deploy=deploy),
            DiverseBranchBlock(2 * width, 2 * width, act_layer=nn.ReLU, deploy=deploy),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(dropout), nn.Linear(2 * width, num_classes)
        )
        self.aux_head = train_only(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes)))

    def forward_train(self, x: Tensor) -> dict[str, Tensor]:
        features = self.stage1(x)
        return {"logits": self.head(self.stage2(features)), "aux_logits": self.aux_head(features)}

    def forward_infer(self, x: Tensor) -> Tensor:
        return self.head(self.stage2(self.stage1(x)))


def digits_net(num_classes: int = 10, **options: Any) -> DigitsNet:
    """A :class:`DigitsNet`; ``options``: ``width``, ``dropout``, ``deploy``."""
    config = {"num_classes": num_classes, **options}
    return attach_recipe(DigitsNet(**config), ModelRecipe("trainfer.models:digits_net", config, (1, 1, 8, 8)))
