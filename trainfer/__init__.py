"""trainfer: train one form of a PyTorch model, serve its exact, cheapest inference form."""

from trainfer import algebra, bench, blocks, models
from trainfer.audit import audit
from trainfer.bundle import load, save
from trainfer.deploy import DeployReport, deploy, explain
from trainfer.dual import DualModule, infer_path, train_only
from trainfer.ensemble import Ensemble
from trainfer.errors import (
    AlgebraError,
    BundleError,
    BundleWarning,
    EquivalenceError,
    InputError,
    ModeError,
    ModeWarning,
    OutputKindWarning,
    TrainferError,
    WriteError,
)
from trainfer.export import export
from trainfer.gate import AccuracyGate, GateReport
from trainfer.guard import guard
from trainfer.inspection import Inspection, LayerRecord, inspect
from trainfer.modes import inference, restore_modes, snapshot_modes, training
from trainfer.predict import Predictor
from trainfer.preprocess import PreprocessSpec
from trainfer.quantize import QuantizationError, quantize
from trainfer.registry import register_model
from trainfer.runtime import CompiledModel, RuntimeRecord, compile
from trainfer.verify import Equivalence, verify

__version__ = "0.1.0"

__all__ = [
    "AccuracyGate",
    "AlgebraError",
    "BundleError",
    "BundleWarning",
    "CompiledModel",
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
    "OutputKindWarning",
    "Predictor",
    "PreprocessSpec",
    "TrainferError",
    "WriteError",
    "QuantizationError",
    "RuntimeRecord",
    "__version__",
    "algebra",
    "export",
    "bench",
    "blocks",
    "compile",
    "models",
    "audit",
    "guard",
    "inference",
    "infer_path",
    "inspect",
    "load",
    "register_model",
    "quantize",
    "restore_modes",
    "save",
    "snapshot_modes",
    "train_only",
    "training",
    "deploy",
    "explain",
    "verify",
]
