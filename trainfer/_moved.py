"""The flat module paths of trainfer 0.1, kept importable for one release as aliases of their new homes.

``import trainfer.predict`` gives the module :mod:`trainfer.serve.predictor` itself (the same
object, so ``mock.patch("trainfer.predict.x")`` patches the real one) and a ``DeprecationWarning``
naming the new path. ``trainfer.deploy``, ``verify``, ``audit``, ``guard``, ``export`` and
``quantize`` are not here: those names are the functions, and no module shadows them any more.
Public names of ``trainfer`` that were renamed (:data:`RENAMED`) resolve the same way, with a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

#: Old path -> new path. Each entry goes in the release after next.
MOVED = {
    f"trainfer.{old}": f"trainfer.{new}"
    for old, new in {
        "algebra": "reparam.algebra",
        "fold": "reparam.fold",
        "protocols": "reparam.protocols",
        "equalize": "reparam.equalize",
        "dual": "modes.dual",
        "inspection": "analysis.inspection",
        "attribution": "analysis.attribution",
        "manifest": "serve.manifest",
        "bundle": "serve.bundle",
        "preprocess": "serve.preprocess",
        "outputs": "serve.outputs",
        "predict": "serve.predictor",
        "ensemble": "serve.ensemble",
        "batch_predict": "serve.batch_predict",
        "distributed": "serve.distributed",
        "runtime": "serve.runtime",
        "gate": "serve.gate",
        "data": "demo.data",
        "train": "demo.train",
        "report": "demo.report",
    }.items()
}


#: Old public name of ``trainfer`` -> its new name (same object). Each entry goes in the release after next.
RENAMED = {"explain": "deploy_report"}  # trainfer.explain gave the deploy report; Predictor.explain gives attributions


def renamed(resolve: Callable[[str], object], name: str) -> object:
    """``resolve(RENAMED[name])`` with a ``DeprecationWarning`` naming the new name (a package's ``__getattr__``)."""
    if name not in RENAMED:
        raise AttributeError(f"module 'trainfer' has no attribute {name!r}")
    warnings.warn(
        f"trainfer.{name} is now trainfer.{RENAMED[name]}; the old name goes in trainfer 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
    return resolve(RENAMED[name])


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new path (imported normally, then aliased)."""

    def __init__(self) -> None:
        self._own_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old path goes in trainfer 0.3", DeprecationWarning, stacklevel=2
        )
        module = importlib.import_module(new)
        assert module.__spec__ is not None  # every imported module has one
        self._own_specs[new] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module ran under its new name): give it back its own spec and loader,
        which the import system has just overwritten with the alias's."""
        assert module.__spec__ is not None  # set by the import system before exec_module
        own = self._own_specs[MOVED[module.__spec__.name]]
        module.__spec__, module.__loader__ = own, own.loader


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import trainfer`` does it)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
