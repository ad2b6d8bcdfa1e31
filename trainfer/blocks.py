"""``trainfer.blocks``: the public home of the re-parameterizable blocks (code: trainfer.reparam.blocks)."""

from trainfer.reparam.blocks import *  # noqa: F403
from trainfer.reparam.blocks import __all__  # noqa: F401
