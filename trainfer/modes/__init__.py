"""Mode safety: inference/training contexts, two-path modules, the forgot-``eval()`` guard.

The contexts are re-exported here (``from trainfer.modes import inference``); the guard and the
two-path modules live in :mod:`trainfer.modes.guard` and :mod:`trainfer.modes.dual`.
"""

from trainfer.modes.contexts import (
    inference,
    mode_dependent_modules,
    restore_modes,
    shared_inference,
    snapshot_modes,
    training,
)

__all__ = ["inference", "mode_dependent_modules", "restore_modes", "shared_inference", "snapshot_modes", "training"]
