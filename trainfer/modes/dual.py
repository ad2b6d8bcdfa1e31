"""Models with two forward paths: one for training, one for inference.

Three forms, from the whole model down to one call:

- :class:`DualModule`: subclass it and write ``forward_train`` and ``forward_infer``; ``forward``
  dispatches on ``self.training``.
- :func:`train_only`: wrap a submodule (auxiliary head, deep-supervision branch) that runs in
  training and returns ``None`` in eval mode.
- :func:`infer_path`: decorate a method (the training path) and name the method that replaces it in
  eval mode.

Every dispatch is a plain Python ``if self.training`` evaluated when the call happens. A
``torch.fx.symbolic_trace`` of a model in eval mode therefore records only the inference path: the
training-only code leaves no node in the graph, and the resulting ``GraphModule`` keeps no reference
to the modules only that path used. This is how the deploy pass drops them.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from trainfer.errors import InputTypeError

__all__ = ["DualModule", "TrainOnly", "infer_path", "train_only"]

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute set on methods decorated with :func:`infer_path` (``trainfer.modes`` finds them by it).
INFER_PATH_MARK = "__trainfer_infer_path__"


def _dispatch(self: DualModule, *args: Any, **kwargs: Any) -> Any:
    """``forward_train(*args, **kwargs)`` when ``self.training``, else ``forward_infer(...)``."""
    if self.training:
        return self.forward_train(*args, **kwargs)
    return self.forward_infer(*args, **kwargs)


def _forward_for(cls: type[DualModule]) -> Callable[..., Any]:
    """A copy of :func:`_dispatch` for ``cls`` whose visible signature is ``cls.forward_infer``'s.

    ``torch.fx`` and ``inspect.signature`` read parameters through ``__wrapped__``; a bare
    ``*args`` would become one un-iterable placeholder when tracing.
    """
    forward = types.FunctionType(_dispatch.__code__, _dispatch.__globals__, "forward")
    forward.__doc__ = _dispatch.__doc__
    forward.__qualname__ = f"{cls.__qualname__}.forward"
    forward.__wrapped__ = cls.forward_infer  # type: ignore[attr-defined]
    return forward


class DualModule(nn.Module):
    """A module computing ``forward_train`` in training mode and ``forward_infer`` in eval mode.

    Both paths receive the same arguments. Their outputs may differ in kind, which is the point:
    a typical ``forward_train`` returns everything the losses need (e.g. a dict of head outputs
    ``{"main": ..., "aux": ...}``), while ``forward_infer`` returns only the prediction served
    (e.g. the main head's logits). Code that consumes the output must therefore know the mode it
    called in; :func:`trainfer.inference` and :func:`trainfer.training` make that explicit.

    ``forward``'s visible signature is ``forward_infer``'s, so ``torch.fx.symbolic_trace`` of a
    model in eval mode names its inputs after ``forward_infer``'s parameters and records only that
    path. Subclasses should not override ``forward``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            cls.forward = _forward_for(cls)

    forward = _dispatch

    def forward_train(self, *args: Any, **kwargs: Any) -> Any:
        """The training path; may return auxiliary outputs (dicts, tuples) the losses need."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_train")

    def forward_infer(self, *args: Any, **kwargs: Any) -> Any:
        """The inference path: the prediction served, computed as cheaply as possible."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_infer")


class TrainOnly(nn.Module):
    """Run ``module`` in training mode; return ``None`` without running it in eval mode.

    The caller must accept ``None`` from it in eval mode (``aux = self.aux(x)`` then
    ``if aux is not None: ...``). Because the check happens in Python, a ``torch.fx`` trace in eval
    mode records no node for the wrapper or anything inside it, and the traced (deployed) model
    does not contain it.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise InputTypeError(f"train_only expects an nn.Module; got {type(module).__name__}")
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            return self.module(*args, **kwargs)
        return None


def train_only(module: nn.Module) -> TrainOnly:
    """Wrap ``module`` so that it runs in training and is skipped (returns ``None``) in eval mode."""
    return TrainOnly(module)


def infer_path(other: Callable[..., Any] | str) -> Callable[[F], F]:
    """Decorate a module's method as its training path; in eval mode, ``other`` runs instead.

    ``other`` is either a method defined earlier in the class body, or the name of a method
    (a string, which also allows methods defined later or overridden in subclasses). Both paths
    get the same arguments. Works on ``forward`` and on any other method; the decorated method
    keeps its name, docstring and signature (``functools.wraps``)::

        class Net(nn.Module):
            def head_infer(self, x):
                return self.main(x)

            @infer_path(head_infer)
            def head(self, x):
                return self.main(x), self.aux(x)
    """
    if not (callable(other) or isinstance(other, str)):
        raise InputTypeError(f"infer_path expects a method or a method name; got {type(other).__name__}")

    def decorate(train_method: F) -> F:
        @functools.wraps(train_method)
        def dispatch(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.training:
                return train_method(self, *args, **kwargs)
            if isinstance(other, str):
                return getattr(self, other)(*args, **kwargs)
            return other(self, *args, **kwargs)

        setattr(dispatch, INFER_PATH_MARK, other)
        return dispatch  # type: ignore[return-value]

    return decorate
