"""trainfer: train one form of a PyTorch model, serve its exact, cheapest inference form.

The package is layered bottom up (see docs/architecture.md): base modules (errors, numerics,
opcount, atomic, capture, recipe, registry), ``reparam``, ``modes``, ``analysis``, ``models``,
``bench``, ``serve``, then the ``demo`` application and the ``cli``. This module only re-exports
the public names.
"""

from trainfer import _moved, bench, blocks, decoding, models
from trainfer._version import __version__
from trainfer.analysis.audit import audit
from trainfer.analysis.inspection import Inspection, LayerRecord, inspect
from trainfer.errors import (
    AlgebraError,
    BundleError,
    BundleWarning,
    DecodingError,
    EquivalenceError,
    InputError,
    ModeError,
    ModeWarning,
    OutputKindWarning,
    TrainferError,
    WriteError,
)
from trainfer.modes.contexts import inference, restore_modes, snapshot_modes, training
from trainfer.modes.dual import DualModule, infer_path, train_only
from trainfer.modes.guard import guard
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
from trainfer.registry import register_model
from trainfer.reparam import algebra
from trainfer.reparam.deploy import DeployReport, deploy, deploy_report
from trainfer.reparam.verify import Equivalence, verify
from trainfer.serve.bundle import load, save
from trainfer.serve.ensemble import Ensemble
from trainfer.serve.export import export
from trainfer.serve.gate import AccuracyGate, GateReport
from trainfer.serve.gated import compile
from trainfer.serve.predictor import Predictor
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.prune import PruningError, prune
from trainfer.serve.quantize import QuantizationError, quantize
from trainfer.serve.runtime import CompiledModel, RuntimeRecord

_moved.install()


def __getattr__(name: str) -> object:
    """Renamed public names (``trainfer.explain`` is :func:`deploy_report`), warned for one release."""
    return _moved.renamed(globals(), name)


__all__ = [
    "AccuracyGate",
    "AlgebraError",
    "BundleError",
    "BundleWarning",
    "CompiledModel",
    "DecodingError",
    "DeployReport",
    "DualModule",
    "Ensemble",
    "Equivalence",
    "EquivalenceError",
    "InputError",
    "GateReport",
    "Inspection",
    "LayerRecord",
    "ModeError",
    "ModeWarning",
    "ModelRecipe",
    "OutputKindWarning",
    "Predictor",
    "PreprocessSpec",
    "TrainferError",
    "WriteError",
    "QuantizationError",
    "PruningError",
    "RuntimeRecord",
    "__version__",
    "algebra",
    "attach_recipe",
    "export",
    "bench",
    "blocks",
    "decoding",
    "compile",
    "models",
    "audit",
    "guard",
    "inference",
    "infer_path",
    "inspect",
    "load",
    "register_model",
    "prune",
    "quantize",
    "recipe_of",
    "restore_modes",
    "save",
    "snapshot_modes",
    "train_only",
    "training",
    "deploy",
    "deploy_report",
    "verify",
]
