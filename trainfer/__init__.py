"""trainfer: train one form of a PyTorch model, serve its exact, cheapest inference form.

The package is layered bottom up (see docs/architecture.md): base modules (errors, numerics,
opcount, atomic, capture, recipe, registry), ``reparam``, ``modes``, ``analysis``, ``models``,
``bench``, ``serve``, then the ``demo`` application and the ``cli``. This module only re-exports
the public names, lazily (PEP 562): ``import trainfer`` imports neither torch nor any submodule;
a public name is imported from its home module (:data:`_HOMES`) on first access and then kept
here, so ``trainfer.deploy is trainfer.reparam.deploy.deploy``. ``trainfer --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trainfer import _moved
from trainfer._version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and IDEs (tests/test_lazy_exports.py checks they agree)
    from trainfer import bench, blocks, decoding, models
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
        WriteWarning,
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


def _homes(table: dict[str, str]) -> dict[str, str]:
    """``{"mod": "a b"}`` -> ``{"a": "mod", "b": "mod"}``: each public name and the module it comes from."""
    return {name: module for module, names in table.items() for name in names.split()}


#: Public name -> the module it is imported from on first access.
_HOMES = _homes(
    {
        "trainfer.analysis.audit": "audit",
        "trainfer.analysis.inspection": "Inspection LayerRecord inspect",
        "trainfer.errors": "AlgebraError BundleError BundleWarning DecodingError EquivalenceError InputError "
        "ModeError ModeWarning OutputKindWarning TrainferError WriteError WriteWarning",
        "trainfer.modes.contexts": "inference restore_modes snapshot_modes training",
        "trainfer.modes.dual": "DualModule infer_path train_only",
        "trainfer.modes.guard": "guard",
        "trainfer.recipe": "ModelRecipe attach_recipe recipe_of",
        "trainfer.registry": "register_model",
        "trainfer.reparam.deploy": "DeployReport deploy deploy_report",
        "trainfer.reparam.verify": "Equivalence verify",
        "trainfer.serve.bundle": "load save",
        "trainfer.serve.ensemble": "Ensemble",
        "trainfer.serve.export": "export",
        "trainfer.serve.gate": "AccuracyGate GateReport",
        "trainfer.serve.gated": "compile",
        "trainfer.serve.predictor": "Predictor",
        "trainfer.serve.preprocess": "PreprocessSpec",
        "trainfer.serve.prune": "PruningError prune",
        "trainfer.serve.quantize": "QuantizationError quantize",
        "trainfer.serve.runtime": "CompiledModel RuntimeRecord",
    }
)

#: Submodules reachable as attributes (``trainfer.models``), imported on first access. The public ones
#: (and ``algebra``, at home in ``trainfer.reparam``) and those ``import trainfer`` used to load as a side effect.
_SUBMODULES = {
    **{name: f"trainfer.{name}" for name in ("bench", "blocks", "decoding", "models")},
    "algebra": "trainfer.reparam.algebra",
    **{
        name: f"trainfer.{name}"
        for name in "analysis atomic capture digest errors extras jsonfile modes numerics opcount recipe "
        "registry reparam serve validate".split()
    },
}

_moved.install()


def __getattr__(name: str) -> object:
    """A public name, imported from its home on first access and kept; renamed ones warn (:mod:`trainfer._moved`)."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        return _moved.renamed(__getattr__, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's own names and every lazy one, as if all were imported."""
    return sorted({*globals(), *_HOMES, *_SUBMODULES})


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
    "WriteWarning",
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
