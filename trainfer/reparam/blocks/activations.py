"""Activations by name: blocks and models take ``act_layer`` as a name or a module class.

A name (``"relu"``, ``"silu"``, ...) is what a model's recipe records, so that a bundle's config
stays JSON; :data:`ACTIVATIONS` is the table of names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trainfer.errors import InputError

#: Every activation name ``act_layer`` accepts, with the module class it builds.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "identity": nn.Identity,
}

#: ``act_layer``: a name of :data:`ACTIVATIONS`, a callable returning a module (a class), or ``None``.
ActLayer = str | Callable[[], nn.Module] | None


def activation_factory(act_layer: ActLayer) -> Callable[[], nn.Module] | None:
    """The module factory ``act_layer`` names (a name looked up in :data:`ACTIVATIONS`, else as given).

    An unknown name raises :class:`~trainfer.errors.InputError` listing the known ones.
    """
    if not isinstance(act_layer, str):
        return act_layer
    try:
        return ACTIVATIONS[act_layer.lower()]
    except KeyError:
        raise InputError(f"unknown act_layer {act_layer!r}; known activation names: {sorted(ACTIVATIONS)}") from None


def recordable_activation(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with an ``act_layer`` class of :data:`ACTIVATIONS` replaced by its name (JSON, for recipes).

    Any other non-name ``act_layer`` cannot be recorded: :class:`~trainfer.errors.InputError` says to
    pass a name.
    """
    act_layer = config.get("act_layer")
    if act_layer is None or isinstance(act_layer, str):
        return config
    names = [name for name, cls in ACTIVATIONS.items() if cls is act_layer]
    if not names:
        raise InputError(
            f"act_layer={act_layer!r} cannot be recorded in the model's recipe (a bundle config holds JSON): "
            f"pass one of the names {sorted(ACTIVATIONS)}, or build the blocks yourself"
        )
    return {**config, "act_layer": names[0]}
