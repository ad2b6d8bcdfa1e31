"""MODEL on the command line: one resolver, one help text and one input-shape fallback for every command.

``deploy``, ``verify``, ``audit``, ``inspect`` and ``bench`` take a model as a MODEL spec, tried in this order:

1. an existing path: a bundle directory (:func:`trainfer.load`; the factory a bundle names must be allowed,
   or the command given ``--trust-factory``: see docs/security.md);
2. ``package.module:factory``: imported and called without arguments (you typed it, so you chose that code);
3. a built-in model name (``digits_net``, ``repvgg_a0``, ...): the factory ``trainfer.models:NAME``.

``--weights`` loads a checkpoint into the model of a factory (2 or 3); a bundle carries its own weights.
The example input shape is ``--input-shape``, else the one the model records (bundles, built-in models).
torch and the serving layer are imported only when a command resolves a model, never for ``--help``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trainfer.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: The one description of MODEL, shown by every command that takes one (its help epilog).
MODEL_HELP = (
    "MODEL is a bundle directory (its factory must be allowed, or pass --trust-factory), "
    "package.module:factory (imported and called without arguments), or a built-in model name "
    "(digits_net, repvgg_a0, ...). --weights loads a checkpoint (.safetensors, or .pt/.pth read with "
    "torch.load(weights_only=True)) into a factory's model; a bundle has its own weights."
)

#: Help of the ``--weights`` options.
WEIGHTS_HELP = "Checkpoint (.safetensors, .pt) for a factory or built-in MODEL."


def factory_of(spec: str) -> str | None:
    """The ``package.module:factory`` that ``spec`` names, or ``None`` when it is an existing path (a bundle).

    A built-in model name ``NAME`` is ``trainfer.models:NAME``. Anything else, and an empty ``spec``
    (which as a path would name the current directory), is an :class:`InputError`.
    """
    if not spec.strip():
        raise InputError("MODEL is empty: expected a bundle path, package.module:factory or a built-in model name")
    if Path(spec).exists():
        return None
    if ":" in spec:
        return spec
    from trainfer.models import FACTORIES

    if spec in FACTORIES:
        return f"trainfer.models:{spec}"
    raise InputError(
        f"MODEL {spec!r} is neither package.module:factory, an existing bundle path, nor a built-in model "
        f"({', '.join(sorted(FACTORIES))})"
    )


def resolve_model(
    spec: str, weights: str | None = None, *, trust_factory: bool = False, weights_flag: str = "--weights"
) -> nn.Module:
    """The model a MODEL spec names (see the module docstring), with ``weights`` loaded into a factory's model.

    ``weights_flag`` is the option that gave ``weights``, named when the file is missing or does not fit.

    A factory's model keeps the recipe its factory attaches (with the input shape it records, also when
    ``weights`` replace its weights), or gets one naming the factory (input shape unknown), so that its
    deploy form can be saved as a bundle. Errors are :class:`~trainfer.errors.TrainferError` subclasses
    (the commands print them on one line and exit 2).
    """
    from torch import nn

    from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of
    from trainfer.serve.bundle import load
    from trainfer.serve.factories import resolve_factory

    factory = factory_of(spec)
    if factory is None:
        if weights:
            raise InputError(f"MODEL {spec!r} is a bundle with its own weights; drop --weights")
        if Path(spec).suffix in (".safetensors", ".pt", ".pth"):
            raise InputError(
                f"MODEL {spec!r} is a checkpoint, not a bundle: name the model that takes it, with --weights "
                f"(e.g. mypkg.models:make_net --weights {spec})"
            )
        return load(spec, trust_factory=trust_factory)
    build = resolve_factory(factory)  # imports or raises a clear BundleError before any weights are read
    _check_callable_bare(build, factory)
    built = build() if not weights else _on_meta(build)
    if not isinstance(built, nn.Module):
        raise InputError(f"MODEL {spec!r}: {factory} returned {type(built).__name__}, not an nn.Module")
    recipe = recipe_of(built) or ModelRecipe(factory)
    if not weights:
        return attach_recipe(built, recipe)
    model = _load_checkpoint(weights, factory, weights_flag)
    # a checkpoint records no input shape: keep the factory's
    return attach_recipe(model, replace(recipe_of(model) or recipe, input_shape=recipe.input_shape))


def _load_checkpoint(weights: str, factory: str, weights_flag: str) -> nn.Module:
    """The model ``factory()`` builds, with the checkpoint ``weights`` loaded (given as ``weights_flag``).

    A missing file is an :class:`InputError` naming the file (not a missing bundle). Weights that do not
    fit say how to build the model with other settings: a factory is called without arguments, so a
    checkpoint of, say, ``digits_net(width=8)`` needs a factory of the user's that builds it.
    """
    from trainfer.errors import BundleError
    from trainfer.serve.bundle import load

    if not Path(weights).is_file():
        raise InputError(f"{weights_flag} file not found: {weights!r} (expected a .safetensors or .pt checkpoint)")
    try:
        return load(weights, factory=factory)
    except BundleError as error:
        if "do not fit" not in str(error):
            raise
        raise BundleError(
            f"{error}; {factory} is called without arguments: for a checkpoint of other settings "
            f"(e.g. width=8), name a factory of yours that builds them, as package.module:factory"
        ) from None


def _check_callable_bare(build: Callable[..., Any], factory: str) -> None:
    """Refuse a factory whose signature needs arguments (an :class:`InputError`), before calling it.

    Only the signature is checked: a TypeError raised inside a factory that can be called bare is
    its own error (a bug, shown with its traceback). A callable without a readable signature is called.
    """
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):
        return
    try:
        signature.bind()
    except TypeError as error:
        raise InputError(f"the factory {factory} cannot be called without arguments: {error}") from None


def _on_meta(build: Callable[[], Any]) -> Any:
    """``build()`` on the meta device: its type and recipe without allocating its weights."""
    import torch

    with torch.device("meta"):
        return build()


def example_shape(model: nn.Module, given: str | None, spec: str, *, min_batch: int = 1) -> tuple[int, ...]:
    """``--input-shape`` parsed, else the shape ``model`` records with a batch of at least ``min_batch``."""
    from trainfer.cli.common import parse_shape
    from trainfer.recipe import recipe_of

    if given is not None:
        return parse_shape(given)
    recorded = getattr(recipe_of(model), "input_shape", None)
    if not recorded:
        raise InputError(
            f"MODEL {spec!r} records no input shape: --input-shape is required, with the batch, e.g. 1,3,224,224"
        )
    return (max(int(recorded[0]), min_batch), *(int(size) for size in recorded[1:]))


def random_input(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A standard normal input of ``shape`` from ``seed``, in the dtype of ``model``'s floating-point weights."""
    import torch

    from trainfer.reparam.verify import model_dtype

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=model_dtype(model))


def model_argument(name: str = "model_spec", metavar: str = "MODEL") -> Callable[[Any], Any]:
    """The MODEL argument (``name`` in the command's keywords)."""
    return click.argument(name, metavar=metavar)


def weights_option(*names: str) -> Callable[[Any], Any]:
    """A ``--weights``-style option (``names`` as :func:`click.option` takes them) for a factory MODEL."""
    return click.option(*(names or ("--weights",)), type=click.Path(dir_okay=False), help=WEIGHTS_HELP)


def refuse_encoder_decoder(model: nn.Module, spec: str, command: str) -> None:
    """Raise :class:`~trainfer.errors.InputError` when ``model`` is an autoregressive encoder-decoder.

    Such a model (:class:`trainfer.decoding.StepModel`: ``encode`` and ``step``) decodes by a loop of
    calls, and its ``forward`` takes target tokens besides the input: ``command``'s one forward of a
    random input cannot run it. The error says what to run instead (its encoder, or its decoding).
    """
    from trainfer.decoding.interface import StepModel

    if isinstance(model, StepModel):
        raise InputError(
            f"MODEL {spec!r} is an autoregressive encoder-decoder (encode/step): it decodes by a loop of calls, "
            f"not one forward of an input, so `trainfer {command}` cannot run it whole; {command} its encoder "
            f"in Python (trainfer.{command}(model.encoder, ...)), or check its decoded sequences with "
            f"`trainfer predict {spec} INPUT`"
        )
