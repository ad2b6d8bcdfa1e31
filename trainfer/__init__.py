"""trainfer: train one form of a PyTorch model, serve its exact, cheapest inference form."""

from trainfer import algebra
from trainfer.dual import DualModule, infer_path, train_only
from trainfer.errors import (
    AlgebraError,
    BundleError,
    EquivalenceError,
    ModeError,
    ModeWarning,
    OutputKindWarning,
)

__version__ = "0.1.0"

__all__ = [
    "AlgebraError",
    "BundleError",
    "DualModule",
    "EquivalenceError",
    "ModeError",
    "ModeWarning",
    "OutputKindWarning",
    "__version__",
    "algebra",
    "infer_path",
    "train_only",
]
