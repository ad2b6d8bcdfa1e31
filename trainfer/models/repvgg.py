"""RepVGG (Ding et al. 2021): a VGG-style stack of RepVGG blocks; A0-A2 and B0 as in the paper."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import nn

from trainfer.recipe import ModelRecipe, attach_recipe
from trainfer.reparam.blocks import RepVGGBlock
from trainfer.reparam.blocks.activations import ActLayer, recordable_activation

BASE_WIDTHS = (64, 128, 256, 512)


class RepVGG(nn.Sequential):
    """``stage0`` (one stride-2 block, ``min(64, 64 a)`` channels), four stages of RepVGG blocks of
    widths ``64 a, 128 a, 256 a, 512 b`` each opening with stride 2, global average pool, linear.

    ``num_blocks`` are the blocks per stage 1-4 and ``width_multipliers`` is ``(a, b)``.
    ``act_layer`` is each block's activation (a name of
    :data:`~trainfer.reparam.blocks.activations.ACTIVATIONS` or a module class; the recipe records the name).
    ``deploy=True`` builds every block in its single-conv form (for loading deploy checkpoints).
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        width_multipliers: Sequence[float],
        num_classes: int = 1000,
        *,
        in_channels: int = 3,
        use_se: bool = False,
        act_layer: ActLayer = "relu",
        deploy: bool = False,
    ) -> None:
        a, b = width_multipliers
        widths = [int(base * m) for base, m in zip(BASE_WIDTHS, (a, a, a, b))]
        block = partial(RepVGGBlock, use_se=use_se, act_layer=act_layer, deploy=deploy)
        planes = min(64, int(64 * a))
        layers: OrderedDict[str, nn.Module] = OrderedDict(stage0=block(in_channels, planes, 3, 2))
        for index, (count, width) in enumerate(zip(num_blocks, widths), start=1):
            blocks = []
            for position in range(count):
                blocks.append(block(planes, width, 3, 2 if position == 0 else 1))
                planes = width
            layers[f"stage{index}"] = nn.Sequential(*blocks)
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["linear"] = nn.Linear(planes, num_classes)
        super().__init__(layers)


def _repvgg(name: str, num_blocks: Sequence[int], width_multipliers: Sequence[float], **config: Any) -> RepVGG:
    model = RepVGG(num_blocks, width_multipliers, **config)
    shape = (1, config.get("in_channels", 3), 224, 224)
    return attach_recipe(model, ModelRecipe(f"trainfer.models:{name}", recordable_activation(config), shape))


def repvgg_a0(num_classes: int = 1000, **options: Any) -> RepVGG:
    """RepVGG-A0: blocks (2, 4, 14, 1), width multipliers (0.75, 2.5); ``options`` go to :class:`RepVGG`."""
    return _repvgg("repvgg_a0", (2, 4, 14, 1), (0.75, 2.5), num_classes=num_classes, **options)


def repvgg_a1(num_classes: int = 1000, **options: Any) -> RepVGG:
    """RepVGG-A1: blocks (2, 4, 14, 1), width multipliers (1, 2.5)."""
    return _repvgg("repvgg_a1", (2, 4, 14, 1), (1.0, 2.5), num_classes=num_classes, **options)


def repvgg_a2(num_classes: int = 1000, **options: Any) -> RepVGG:
    """RepVGG-A2: blocks (2, 4, 14, 1), width multipliers (1.5, 2.75)."""
    return _repvgg("repvgg_a2", (2, 4, 14, 1), (1.5, 2.75), num_classes=num_classes, **options)


def repvgg_b0(num_classes: int = 1000, **options: Any) -> RepVGG:
    """RepVGG-B0: blocks (4, 6, 16, 1), width multipliers (1, 2.5)."""
    return _repvgg("repvgg_b0", (4, 6, 16, 1), (1.0, 2.5), num_classes=num_classes, **options)
