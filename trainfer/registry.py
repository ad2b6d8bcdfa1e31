"""The model factories a bundle may name: the allow-list that keeps a bundle from running code.

A bundle's manifest names the factory that rebuilds its architecture (``"package.module:function"``).
Loading never imports a module because a manifest names it: the name must be one of

- a factory registered by code the user already ran: trainfer's own models, and any function
  decorated with :func:`register_model` (it is listed under ``"module:qualname"``, the name
  ``trainfer.save`` records for it, and under the optional ``name=``);
- an entry point of the ``trainfer.models`` group, declared by a package the user installed
  (``[project.entry-points."trainfer.models"] my_net = "my_pkg.nets:my_net"``), matched by its
  name or its ``module:attribute`` value. Only the names are read until one matches; the
  matching entry point is then imported (installing the package is the user's consent).

Anything else is refused by :func:`trainfer.serve.bundle.load` before any import, unless the caller
passes the factory itself (``factory=``) or opts in with ``trust_factory=True``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

ENTRY_POINT_GROUP = "trainfer.models"

F = TypeVar("F", bound=Callable[..., Any])

_registry: dict[str, Callable[..., Any]] = {}
_lock = threading.Lock()

__all__ = ["ENTRY_POINT_GROUP", "allowed_factory", "factory_name", "register_model", "registered_names"]


def factory_name(factory: Callable[..., Any]) -> str:
    """``"module:qualname"`` of ``factory``: the name a bundle records for it."""
    return f"{factory.__module__}:{factory.__qualname__}"


def register_model(factory: F | None = None, *, name: str | None = None) -> Any:
    """Allow bundles to name ``factory`` (decorator, with or without ``name=``); returns it unchanged.

    ``@trainfer.register_model`` lists the function under ``"module:qualname"``;
    ``@trainfer.register_model(name="my_net")`` also under ``"my_net"``. Registering takes effect
    when the decorated code runs, so import the module before loading its bundles.
    """

    def register(function: F) -> F:
        if not callable(function):
            from trainfer.errors import InputTypeError

            raise InputTypeError(f"register_model expects a callable; got {type(function).__name__}")
        with _lock:
            _registry[factory_name(function)] = function
            if name is not None:
                _registry[str(name)] = function
        return function

    return register(factory) if factory is not None else register


def registered_names() -> list[str]:
    """Every factory name a bundle may use: registered ones, then installed entry points' values."""
    with _lock:
        names = sorted(_registry)
    return names + sorted({entry.value for entry in _entry_points()} - set(names))


def allowed_factory(spec: str) -> Callable[..., Any] | None:
    """The allowed factory named ``spec``, or ``None``; imports only a matching installed entry point."""
    with _lock:
        found = _registry.get(spec)
    if found is not None:
        return found
    for entry in _entry_points():
        if spec in (entry.value, entry.name):
            return entry.load()
    return None


def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    """The installed ``trainfer.models`` entry points (names and values only: nothing is imported)."""
    return tuple(metadata.entry_points(group=ENTRY_POINT_GROUP))
