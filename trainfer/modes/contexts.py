"""Train and eval modes made explicit: exact snapshots, safe contexts, and who depends on the mode.

``model.eval()`` and ``torch.no_grad()`` are unrelated switches: the first changes what
BatchNorm, Dropout and friends compute, the second only stops autograd. :func:`inference` flips
both; :func:`training` is its mirror image. Both restore every submodule's own ``training`` flag on
exit, so mixed states (a frozen BatchNorm kept in eval inside a training model) survive.
"""

from __future__ import annotations

import dis
import functools
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainfer.errors import InputError, InputTypeError
from trainfer.modes.dual import INFER_PATH_MARK, DualModule, TrainOnly

__all__ = [
    "ModeDependent",
    "inference",
    "mode_dependence",
    "mode_dependent_modules",
    "restore_modes",
    "shared_inference",
    "snapshot_modes",
    "training",
]


def snapshot_modes(model: nn.Module) -> dict[str, bool]:
    """Every submodule's ``training`` flag, by qualified name (``""`` is ``model`` itself)."""
    _check_module(model)
    return {name: module.training for name, module in model.named_modules()}


def restore_modes(model: nn.Module, snapshot: dict[str, bool]) -> None:
    """Set each submodule's own ``training`` flag back to ``snapshot`` (no recursion, exact).

    Raises ``ValueError`` naming the modules if ``snapshot`` was taken from a different structure.
    """
    modules = dict(model.named_modules())
    if modules.keys() != snapshot.keys():
        missing = sorted(modules.keys() - snapshot.keys())
        extra = sorted(snapshot.keys() - modules.keys())
        raise InputError(
            f"mode snapshot does not match {type(model).__name__}'s modules: "
            f"not in snapshot {missing[:5]}, not in model {extra[:5]}"
        )
    for name, module in modules.items():
        module.training = snapshot[name]


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"expected a torch.nn.Module; got {type(model).__name__}")


@contextmanager
def _modes(models: tuple[nn.Module, ...], train: bool, grad_mode: Callable[[], Any]) -> Iterator[None]:
    """Set every model to ``train`` inside ``grad_mode()``; restore each submodule's flag on exit.

    The flags are kept per module object, not per name: modules added inside the context keep
    the mode they were given, modules removed or replaced inside get theirs back all the same,
    and an exception raised inside propagates unchanged.
    """
    for model in models:
        _check_module(model)
    snapshots = [[(module, module.training) for module in model.modules()] for model in models]
    try:
        with grad_mode():
            for model in models:
                model.train(train)
            yield
    finally:
        # Reverse order: a model passed twice (or sharing modules) ends as before the first.
        for snapshot in reversed(snapshots):
            for module, flag in snapshot:
                module.training = flag


def inference(*models: nn.Module) -> AbstractContextManager[None]:
    """Eval mode and ``torch.inference_mode()`` for ``models``; usable as ``with`` or as a decorator.

    On exit (also on an exception, also nested) every submodule of every model gets back its own
    previous ``training`` flag.
    """
    return _modes(models, False, torch.inference_mode)


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _lock_of(model: nn.Module) -> threading.RLock:
    lock = _LOCKS.get(model)  # once made, read without the module-wide lock
    if lock is None:
        with _LOCKS_LOCK:
            lock = _LOCKS.setdefault(model, threading.RLock())
    return lock


def _any_training(model: nn.Module) -> bool:
    """Whether ``model`` or any submodule is in training mode, read from every module's own flag now.

    The modules are those of ``model.modules()`` (each once, a module reachable by several paths or
    holding an ancestor too), walked through ``_modules`` without building their qualified names,
    which ``modules()`` does and which cost most of a small model's check.
    """
    seen = {model}
    pending = [model]
    for module in pending:  # grows as children are found
        if module.training:
            return True
        for child in module._modules.values():
            if child is not None and child not in seen:
                seen.add(child)
                pending.append(child)
    return False


def shared_inference(model: nn.Module) -> AbstractContextManager[None]:
    """:func:`inference` for a model that other threads may be running at the same time.

    A model whose every submodule is already in eval only enters ``torch.inference_mode()``:
    nothing is switched, and concurrent calls run in parallel. Otherwise the switch to eval, the
    body and the restore all run holding a lock of that model (re-entrant, one per model object),
    so concurrent calls run one at a time and none sees another's switch. Only mode changes made
    through this function are synchronised.
    """
    _check_module(model)
    return _SharedInference(model)


class _SharedInference:
    """The context :func:`shared_inference` returns, for one ``with``. A class rather than a
    generator: it wraps every batch a server computes, and a generator's context costs about as
    much again as the check of the modes."""

    __slots__ = ("_held", "_inner", "_model")

    def __init__(self, model: nn.Module):
        self._model = model
        self._held: threading.RLock | None = None  # the model's lock, while a switch to eval lasts
        self._inner: AbstractContextManager[Any] | None = None

    def __enter__(self) -> None:
        lock = _lock_of(self._model)
        with lock:
            if _any_training(self._model):
                self._inner = inference(self._model)
                self._inner.__enter__()
                lock.acquire()  # re-entrant: still held when this block ends, until __exit__
                self._held = lock
                return
        self._inner = torch.inference_mode()
        self._inner.__enter__()

    def __exit__(self, *error: Any) -> None:
        assert self._inner is not None
        try:
            self._inner.__exit__(*error)  # the modes restored (an exception inside propagates)
        finally:
            if self._held is not None:
                self._held.release()


def training(*models: nn.Module) -> AbstractContextManager[None]:
    """Training mode with gradients on (also inside ``inference_mode``); restores like :func:`inference`."""
    return _modes(models, True, _grad_on)


@contextmanager
def _grad_on() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


@dataclass(frozen=True)
class ModeDependent:
    """A module whose forward computes differently in training and eval mode, and how."""

    name: str
    module: nn.Module
    kind: str  # "batchnorm", "dropout", "dual", "train_only" or "reads_training"
    how: str


def mode_dependence(module: nn.Module) -> tuple[str, str] | None:
    """``(kind, how)`` if ``module``'s own computation depends on its mode, else ``None``.

    Containers are not mode-dependent themselves (their children are listed on their own).
    Detected: BatchNorm/InstanceNorm of any kind that tracks running statistics; Dropout of any
    kind with ``p > 0``; :class:`~trainfer.DualModule`; :class:`~trainfer.modes.dual.TrainOnly`; and any
    module whose ``forward`` (or a method decorated with :func:`~trainfer.infer_path`) reads
    ``self.training``. Helpers called from ``forward`` are not inspected.
    """
    if isinstance(module, nn.modules.batchnorm._NormBase):
        if not module.track_running_stats:
            return None
        return (
            "batchnorm",
            "training: normalises with the input's own statistics, updates running stats; eval: uses running stats",
        )
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.p == 0:
            return None
        return "dropout", f"training: zeroes activations with p={module.p}; eval: identity"
    if isinstance(module, DualModule):
        return "dual", "training: forward_train; eval: forward_infer"
    if isinstance(module, TrainOnly):
        return "train_only", f"training: runs {type(module.module).__name__}; eval: skipped, returns None"
    # a class is hashable; mypy reads nn.Module's __hash__ as the unbound method and disagrees
    readers = _methods_reading_training(type(module))  # type: ignore[arg-type]
    if readers:
        return "reads_training", f"{', '.join(readers)} reads self.training"
    return None


def mode_dependent_modules(model: nn.Module) -> list[ModeDependent]:
    """Every submodule of ``model`` (itself included) whose behaviour depends on the mode."""
    _check_module(model)
    found = []
    for name, module in model.named_modules():
        dependence = mode_dependence(module)
        if dependence is not None:
            found.append(ModeDependent(name, module, *dependence))
    return found


@functools.cache
def _methods_reading_training(cls: type) -> tuple[str, ...]:
    """Names of ``cls``'s ``forward`` and ``infer_path`` methods whose code reads ``.training``."""
    own_classes = cls.__mro__[: cls.__mro__.index(nn.Module)]
    names = ["forward"] + sorted(
        {
            name
            for klass in own_classes
            for name, value in vars(klass).items()
            if name != "forward" and hasattr(value, INFER_PATH_MARK)
        }
    )
    return tuple(f"{name}()" for name in names if _reads_training(getattr(cls, name, None)))


def _reads_training(function: Any) -> bool:
    """Whether ``function`` (or what it wraps, or a function nested in it) loads an attribute ``training``."""
    while function is not None:
        code = getattr(function, "__code__", None)
        if code is not None and _code_reads_training(code):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def _code_reads_training(code: types.CodeType) -> bool:
    if "training" in code.co_names:
        for instruction in dis.get_instructions(code):
            if instruction.opname in ("LOAD_ATTR", "LOAD_METHOD") and instruction.argval == "training":
                return True
    return any(isinstance(const, types.CodeType) and _code_reads_training(const) for const in code.co_consts)
