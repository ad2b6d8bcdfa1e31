"""trainfer's optional dependencies (``[project.optional-dependencies]``), imported on first use.

A module that needs onnxruntime, OpenVINO or Captum calls :func:`require` where it uses it, so that
``import trainfer`` never pays for them and a missing one is a :class:`trainfer.MissingExtraError`
that names the ``pip install`` line, not a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trainfer.errors import MissingExtraError

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a MissingExtraError saying that ``purpose`` needs the extra ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'trainfer[{extra}]' (trainfer's optional extra {extra!r})"
        ) from error
