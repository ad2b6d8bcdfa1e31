"""``trainfer.blocks``: the public home of the re-parameterizable blocks (code: trainfer.reparam.blocks)."""

from trainfer.reparam.blocks import (
    ACBlock,
    DiverseBranchBlock,
    MobileOneBlock,
    QARepVGGBlock,
    ReparamBlock,
    RepVGGBlock,
    SqueezeExcite,
)

__all__ = [
    "ACBlock",
    "DiverseBranchBlock",
    "MobileOneBlock",
    "QARepVGGBlock",
    "RepVGGBlock",
    "ReparamBlock",
    "SqueezeExcite",
]
