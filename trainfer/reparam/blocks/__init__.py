"""Re-parameterizable blocks: multi-branch in training, one conv after ``reparameterize()``.

Every block is a :class:`ReparamBlock`: constructor arguments as ``nn.Conv2d``, ``deploy=True`` to
build the single-conv form directly, ``reparameterize()`` to convert in place (idempotent).
"""

from trainfer.reparam.blocks.acnet import ACBlock
from trainfer.reparam.blocks.base import ReparamBlock
from trainfer.reparam.blocks.dbb import DiverseBranchBlock
from trainfer.reparam.blocks.mobileone import MobileOneBlock
from trainfer.reparam.blocks.qarepvgg import QARepVGGBlock
from trainfer.reparam.blocks.repvgg import RepVGGBlock
from trainfer.reparam.blocks.se import SqueezeExcite

__all__ = [
    "ACBlock",
    "DiverseBranchBlock",
    "MobileOneBlock",
    "QARepVGGBlock",
    "RepVGGBlock",
    "ReparamBlock",
    "SqueezeExcite",
]
