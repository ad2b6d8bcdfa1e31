"""Which code may build the architecture a manifest names, and building it within bounds.

A manifest is untrusted: :func:`manifest_factory` returns the callable that may build the factory it names
(the caller's own ``factory``; else one :mod:`trainfer.registry` allows, importing nothing else; else, with
``trust_factory``, whatever it names). :func:`call_factory` builds it, first on the meta device when the
stored weights bound the size (:data:`MAX_GROWTH`). :func:`resolve_factory` imports a name the *user* gave.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.errors import BundleError
from trainfer.registry import ENTRY_POINT_GROUP
from trainfer.registry import allowed_factory as registered_factory

#: A manifest's config may build at most this many times the weight elements its bundle stores
#: (a deploy form stores fewer than its training form), and always up to MIN_SIZE_LIMIT.
MAX_GROWTH = 16
MIN_SIZE_LIMIT = 2**20

__all__ = ["MAX_GROWTH", "MIN_SIZE_LIMIT", "call_factory", "manifest_factory", "resolve_factory"]


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """``package.module:function`` (dotted attributes allowed after the colon) to the callable.

    Imports the module: only for names the user gave (command line, ``factory=``), never for a
    name read from a bundle (see :func:`manifest_factory`).
    """
    module_name, sep, attribute = str(spec).partition(":")
    if not sep or not module_name or not attribute:
        raise BundleError(f"factory must look like package.module:function; got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as error:
        raise BundleError(
            f"cannot import {module_name!r} for factory {spec!r}: {error}{_not_found(error, module_name)}"
        ) from None
    except AttributeError:
        raise BundleError(f"module {module_name!r} has no attribute {attribute!r} (factory {spec!r})") from None
    if not callable(target):
        raise BundleError(f"factory {spec!r} is not callable")
    return target


def _not_found(error: ImportError, module_name: str) -> str:
    """How to make ``module_name`` importable, when ``error`` is that module (or a package above it) not
    found: the ``trainfer`` command does not search the current directory, and does not add it on its
    own (a file there named like the module, say in a downloaded bundle's folder, would be run)."""
    missing = getattr(error, "name", None)
    if not isinstance(error, ModuleNotFoundError) or not missing or not f"{module_name}.".startswith(f"{missing}."):
        return ""  # the module was found and failed on an import of its own: that error says what
    return (
        " (the module must be importable: installed, or on PYTHONPATH; the trainfer command does not search "
        "the current directory, so from the directory holding it run PYTHONPATH=. trainfer ...)"
    )


def manifest_factory(
    name: str, factory: str | Callable[..., nn.Module] | None = None, trust_factory: bool = False
) -> Callable[..., nn.Module]:
    """The callable that may build the architecture a manifest names ``name``.

    ``factory`` given by the caller wins; else ``name`` must be allowed by :mod:`trainfer.registry`
    (nothing is imported unless it names an installed entry point), or ``trust_factory`` be set.
    """
    if callable(factory):
        return factory
    if isinstance(factory, str):
        return resolve_factory(factory)
    if name.startswith("trainfer.models:"):  # trainfer's own register when trainfer.models is imported (lazily)
        importlib.import_module("trainfer.models")
    try:
        found = registered_factory(name)
    except Exception as error:  # an installed entry point that fails to import: the user's package
        raise BundleError(f"the {ENTRY_POINT_GROUP!r} entry point for factory {name!r} failed: {error}") from error
    if found is not None:
        return found
    if trust_factory:
        return resolve_factory(name)
    raise BundleError(_refusal(name))


def _refusal(name: str) -> str:
    """Why the factory ``name`` is refused and the ways to allow it: the command line's first (there no code
    of the user's runs before loading, so registering it in code is no way), then Python's."""
    module = name.partition(":")[0]
    return (
        f"refusing to build factory {name!r}: a bundle may only name allowed factories (nothing was imported). "
        f"To allow it on the command line: --trust-factory, if you trust whoever wrote this bundle (it imports "
        f"{module!r} and runs that code: run where it is importable, e.g. PYTHONPATH=. from its directory), or "
        f"install a package declaring the factory in the {ENTRY_POINT_GROUP!r} entry-point group (docs/security.md). "
        "In Python: decorate it with @trainfer.register_model in code you import before loading, pass "
        "factory=<callable> to trainfer.load / Predictor.load, or trust_factory=True (trusted authors only)"
    )


def call_factory(
    build: Callable[..., Any], name: str, config: Mapping[str, Any], stored: int | None = None
) -> nn.Module:
    """``build(**config)`` as a module; with ``stored`` (weight elements the bundle holds), refused first when
    its architecture (built on the meta device) is over ``MAX_GROWTH`` times that."""
    if stored is not None:
        _check_size(build, name, config, stored)
    try:
        model = build(**config)
    except Exception as error:  # the factory is allowed code; what it failed on is the manifest's config
        raise BundleError(f"config: factory {name!r} failed on config {dict(config)}: {error}") from error
    if not isinstance(model, nn.Module):
        raise BundleError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _check_size(build: Callable[..., Any], name: str, config: Mapping[str, Any], stored: int) -> None:
    """Refuse a config whose architecture (built on the meta device) dwarfs the stored weights.

    A factory that cannot build on the meta device is skipped here (it is built normally).
    """
    try:
        with torch.device("meta"):
            probe = build(**config)
        size = sum(t.numel() for t in probe.state_dict().values() if isinstance(t, Tensor))
    except Exception:
        return
    if size > max(MAX_GROWTH * stored, MIN_SIZE_LIMIT):
        raise BundleError(
            f"config: factory {name!r} with config {dict(config)} builds {size} weight elements, but the bundle "
            f"stores {stored}: refusing to allocate more than {MAX_GROWTH}x the stored weights"
        )
