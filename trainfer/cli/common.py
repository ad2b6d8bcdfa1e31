"""Helpers shared by the command-line commands: model specs, shapes, friendly errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click
from torch import nn

from trainfer.errors import BundleError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,3,224,224; got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise click.BadParameter(f"expected positive sizes like 1,3,224,224; got {text!r}")
    return shape


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``package.module:factory`` (like uvicorn's ``app:main``) to a callable.

    The one resolver is :func:`trainfer.bundle.resolve_factory`; here its error becomes a usage error.
    """
    from trainfer.bundle import resolve_factory

    try:
        return resolve_factory(spec)
    except BundleError as error:
        raise click.BadParameter(str(error)) from None


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into a one-line message and exit code 2 (traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ValueError, FileNotFoundError, KeyError, TypeError) as error:
            if debug:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper
