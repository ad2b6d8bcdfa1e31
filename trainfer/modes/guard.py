"""Catch a forgotten ``eval()`` (and a batch of one through training BatchNorm) when it happens.

:func:`guard` installs ONE forward pre-hook on the root module. Per forward it reads
``torch.is_grad_enabled()`` and the ``training`` flags of a list of mode-dependent modules cached
when the guard was installed, so its cost does not grow with the model's depth beyond that list.
Re-install the guard after adding modules to a guarded model.

Two situations are reported, as :class:`~trainfer.ModeWarning` (once per guard) or, when
``strict``, as :class:`~trainfer.ModeError` (every time):

- gradients are off (``torch.no_grad`` or ``torch.inference_mode``: someone is predicting) but
  mode-dependent modules are still in training mode;
- a training-mode forward with a batch of one goes through BatchNorm in training mode: the batch
  statistics of a single sample are meaningless, and torch's own error for it
  ("Expected more than 1 value per channel when training") does not say what to do.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.errors import InputTypeError, ModeError, ModeWarning
from trainfer.modes.contexts import mode_dependent_modules

__all__ = ["GuardHandle", "guard"]

_SHOWN = 5
_INTERNAL_DIRS = (os.path.dirname(nn.Module.__call__.__code__.co_filename), os.path.dirname(__file__))


class GuardHandle:
    """An installed guard: ``remove()`` it, or use it as a context manager that removes it on exit."""

    def __init__(self, model: nn.Module, strict: bool):
        watched = mode_dependent_modules(model)
        self.strict = strict
        self.watched = [(d.name or type(model).__name__, d.module) for d in watched]
        self.batchnorms = [(name, module) for (name, module), d in zip(self.watched, watched) if d.kind == "batchnorm"]
        self._warned: set[str] = set()
        self._handle = model.register_forward_pre_hook(self._check, with_kwargs=True)

    def remove(self) -> None:
        """Uninstall the hook (idempotent)."""
        self._handle.remove()

    def __enter__(self) -> GuardHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _check(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            training = [(name, module) for name, module in self.watched if module.training]
            if training:
                self._report("eval", _forgot_eval_message(training))
        elif _batch_size(args, kwargs) == 1:
            training = [(name, module) for name, module in self.batchnorms if module.training]
            if training:
                self._report("batch1", _batch_of_one_message(training))

    def _report(self, problem: str, message: str) -> None:
        if self.strict:
            raise ModeError(message)
        if problem not in self._warned:
            self._warned.add(problem)
            warnings.warn(message, ModeWarning, stacklevel=_caller_stacklevel())


def guard(model: nn.Module, strict: bool = False) -> GuardHandle:
    """Watch ``model``'s forward passes for mode mistakes; returns a handle that removes the watch.

    Warns (:class:`~trainfer.ModeWarning`, once per guard and problem) or raises
    (:class:`~trainfer.ModeError`, when ``strict``) when a forward runs with gradients off while
    mode-dependent modules train, or in training mode with a batch of one through BatchNorm. Eval
    models, models without mode-dependent modules and grad-enabled training never trigger it.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"guard expects a torch.nn.Module; got {type(model).__name__}")
    return GuardHandle(model, strict)


def _named(modules: list[tuple[str, nn.Module]]) -> str:
    shown = ", ".join(f"{name} ({type(module).__name__})" for name, module in modules[:_SHOWN])
    more = len(modules) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _forgot_eval_message(training: list[tuple[str, nn.Module]]) -> str:
    return (
        f"forward pass with gradients off (no_grad / inference_mode) but {len(training)} mode-dependent "
        f"module(s) in training mode: {_named(training)}. Predictions will use batch statistics and dropout; "
        "call model.eval() or run inside `with trainfer.inference(model):`."
    )


def _batch_of_one_message(training: list[tuple[str, nn.Module]]) -> str:
    return (
        f"training-mode forward pass with batch size 1 through BatchNorm in training mode: {_named(training)}. "
        "BatchNorm normalises over the batch, so one sample gives meaningless statistics (torch raises "
        "'Expected more than 1 value per channel when training' where a layer sees one value per channel). "
        "Train with batches of 2 or more; to predict, use model.eval() or `with trainfer.inference(model):`."
    )


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Size of the first dimension of the first tensor argument (positional first), if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.shape[0] if value.dim() > 0 else None
    return None


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside torch.nn and trainfer."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) in _INTERNAL_DIRS:
        frame, level = frame.f_back, level + 1
    return level
