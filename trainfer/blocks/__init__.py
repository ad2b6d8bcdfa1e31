"""Re-parameterizable blocks: multi-branch in training, one conv after ``reparameterize()``.

Every block is a :class:`ReparamBlock`: constructor arguments as ``nn.Conv2d``, ``deploy=True`` to
build the single-conv form directly, ``reparameterize()`` to convert in place (idempotent).
"""

from trainfer.blocks.acnet import ACBlock
from trainfer.blocks.base import ReparamBlock
from trainfer.blocks.dbb import DiverseBranchBlock
from trainfer.blocks.mobileone import MobileOneBlock
from trainfer.blocks.qarepvgg import QARepVGGBlock
from trainfer.blocks.repvgg import RepVGGBlock
from trainfer.blocks.se import SqueezeExcite

__all__ = [
    "ACBlock",
    "DiverseBranchBlock",
    "MobileOneBlock",
    "QARepVGGBlock",
    "RepVGGBlock",
    "ReparamBlock",
    "SqueezeExcite",
]
