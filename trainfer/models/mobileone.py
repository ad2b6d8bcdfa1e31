"""MobileOne (Vasu et al. 2023): depthwise kxk + pointwise 1x1 MobileOne blocks; the S0 variant."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn

from trainfer.recipe import ModelRecipe, attach_recipe
from trainfer.reparam.blocks import MobileOneBlock
from trainfer.reparam.blocks.activations import recordable_activation

BASE_WIDTHS = (64, 128, 256, 512)


class MobileOne(nn.Sequential):
    """``stage0`` (a stride-2 3x3 block, ``min(64, 64 w0)`` channels), four stages of widths
    ``(64, 128, 256, 512) * width_multipliers``, global average pool, linear.

    Each stage unit is a depthwise 3x3 MobileOne block (stride 2 for a stage's first unit) and a
    pointwise 1x1 one, each with ``num_conv_branches`` kxk branches (stage0 has one). ``use_se``
    puts squeeze-excitation in the second half of stage 3 and all of stage 4, as the reference does.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 8, 10, 1),
        width_multipliers: Sequence[float] = (0.75, 1.0, 1.0, 2.0),
        num_classes: int = 1000,
        *,
        num_conv_branches: int = 1,
        in_channels: int = 3,
        use_se: bool = False,
        deploy: bool = False,
    ) -> None:
        widths = [int(base * m) for base, m in zip(BASE_WIDTHS, width_multipliers)]
        se_blocks = [0, 0, num_blocks[2] // 2, num_blocks[3]] if use_se else [0, 0, 0, 0]
        planes = min(64, int(64 * width_multipliers[0]))
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stage0=MobileOneBlock(in_channels, planes, 3, 2, deploy=deploy)
        )
        for index, (count, width, with_se) in enumerate(zip(num_blocks, widths, se_blocks), start=1):
            blocks = []
            for position in range(count):
                block = partial(
                    MobileOneBlock,
                    num_conv_branches=num_conv_branches,
                    use_se=position >= count - with_se,
                    deploy=deploy,
                )
                stride = 2 if position == 0 else 1
                blocks.append(block(planes, planes, 3, stride, groups=planes))
                blocks.append(block(planes, width, 1))
                planes = width
            layers[f"stage{index}"] = nn.Sequential(*blocks)
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["linear"] = nn.Linear(planes, num_classes)
        super().__init__(layers)


def mobileone_s0(num_classes: int = 1000, **options: Any) -> MobileOne:
    """MobileOne-S0: blocks (2, 8, 10, 1), width multipliers (0.75, 1, 1, 2), 4 kxk branches."""
    config = {"num_classes": num_classes, **options}
    model = MobileOne((2, 8, 10, 1), (0.75, 1.0, 1.0, 2.0), num_conv_branches=4, **config)
    shape = (1, config.get("in_channels", 3), 224, 224)
    return attach_recipe(model, ModelRecipe("trainfer.models:mobileone_s0", recordable_activation(config), shape))
