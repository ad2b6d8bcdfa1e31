"""``trainfer deploy MODEL --input-shape 1,3,224,224 -o OUT``: fold, verify, report, save.

Exit codes: 0 deployed and verified, 1 the deployed form is not equivalent (report printed,
nothing written), 2 bad input (unknown model, unreadable weights, shape that does not fit).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click
import torch
from torch import nn
from tqdm.auto import tqdm

from trainfer.cli.common import Tolerance, friendly_errors, load_factory, parse_shape, trust_factory_option, trusted
from trainfer.errors import EquivalenceError
from trainfer.recipe import ModelRecipe, attach_recipe, recipe_of


def load_model(spec: str, weights: str | None) -> nn.Module:
    """A bundle directory, or ``package.module:factory`` (with an optional checkpoint), as a model.

    A factory model without a recipe gets one naming ``spec`` (input shape unknown yet), so that
    its deploy form can be saved as a bundle.
    """
    from trainfer.serve.bundle import load

    if Path(spec).exists():
        if weights:
            raise click.BadParameter(f"{spec!r} is a bundle with its own weights; drop --weights")
        return load(spec, trust_factory=trusted())
    factory = load_factory(spec)  # resolves or raises a clear BadParameter before the bundle code runs
    model = load(weights, factory=spec) if weights else factory()
    if not isinstance(model, nn.Module):
        raise click.BadParameter(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model if recipe_of(model) is not None else attach_recipe(model, ModelRecipe(spec))


def example_input(model: nn.Module, input_shape: str | None) -> torch.Tensor:
    """A seeded random input of ``--input-shape`` (or the model's recorded shape), in the model's dtype."""
    recorded = getattr(recipe_of(model), "input_shape", None)
    if input_shape is None and not recorded:
        raise click.BadParameter("--input-shape is required (the model records no input shape), e.g. 1,3,224,224")
    shape = parse_shape(input_shape) if input_shape is not None else tuple(recorded or ())
    from trainfer.reparam.verify import model_dtype

    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=model_dtype(model))


@click.command("deploy")
@click.argument("model_spec", metavar="MODEL")
@click.option("--weights", type=click.Path(dir_okay=False), help="Checkpoint (.safetensors, .pt) for a factory.")
@click.option("--input-shape", help="Example input shape with batch, e.g. 1,3,224,224 (default: recorded one).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory, or FILE.safetensors.")
@click.option("--rtol", type=Tolerance(), help="Relative tolerance of the model-dtype check (default per dtype).")
@click.option("--atol", type=Tolerance(zero=True), help="Absolute tolerance of the model-dtype check (default 0).")
@click.option("--no-protocols", is_flag=True, help="Do not call reparameterize()/switch_to_deploy()/fuse().")
@click.option("--prune-dead", is_flag=True, help="Also remove provably dead channels, exactly (docs/pruning.md).")
@trust_factory_option
@friendly_errors
def command(
    model_spec: str,
    weights: str | None,
    input_shape: str | None,
    output: str,
    rtol: float | None,
    atol: float | None,
    no_protocols: bool,
    prune_dead: bool,
) -> None:
    """Fold MODEL (package.module:factory or a bundle) into its inference form, verify it, save it."""
    from trainfer.atomic import atomic_file
    from trainfer.reparam.deploy import deploy
    from trainfer.serve.bundle import save

    with tqdm(total=3, desc="deploy", unit="step", file=sys.stderr, disable=None) as bar:
        bar.set_postfix_str("loading")
        model = load_model(model_spec, weights)
        x = example_input(model, input_shape)
        recipe = recipe_of(model)
        if recipe is not None and recipe.input_shape is None:
            attach_recipe(model, replace(recipe, input_shape=tuple(x.shape)))
        bar.update()
        bar.set_postfix_str("folding and verifying")
        try:
            deployed = deploy(model, x, rtol=rtol, atol=atol, protocols=not no_protocols, prune_dead=prune_dead)
        except EquivalenceError as error:
            bar.close()
            click.echo(str(error.report))
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        bar.update()
        bar.set_postfix_str("saving")
        if output.endswith(".safetensors"):
            from trainfer.serve.bundle_write import write_safetensors

            with atomic_file(output) as tmp:
                write_safetensors({k: v.contiguous() for k, v in deployed.state_dict().items()}, tmp)
        else:
            save(deployed, output, example_inputs=x)
        bar.update()
    click.echo(str(deployed.trainfer_report))
    click.echo(f"wrote {output}")
