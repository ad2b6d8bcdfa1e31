"""``trainfer deploy MODEL --input-shape 1,3,224,224 -o OUT``: fold, verify, report, save.

Exit codes: 0 deployed and verified, 1 the deployed form is not equivalent (report printed,
nothing written), 2 bad input (unknown model, unreadable weights, shape that does not fit).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from trainfer.cli.common import Tolerance, check_output_apart, friendly_errors, trust_factory_option, trusted
from trainfer.cli.model_spec import (
    MODEL_HELP,
    example_shape,
    factory_of,
    model_argument,
    random_input,
    resolve_model,
    weights_option,
)


@click.command("deploy", epilog=MODEL_HELP)
@model_argument()
@weights_option()
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
    """Fold MODEL into its inference form, verify it, save it (a bundle MODEL's task, labels, heads,
    preprocessing and decoder are carried over)."""
    from tqdm.auto import tqdm

    from trainfer.atomic import atomic_file, check_target
    from trainfer.errors import EquivalenceError
    from trainfer.recipe import attach_recipe, recipe_of
    from trainfer.reparam.deploy import deploy
    from trainfer.serve.bundle import read_manifest, save
    from trainfer.serve.bundle_write import check_replaceable, save_derived

    check_target(output, "--output", directory=not output.endswith(".safetensors"))
    bundle = [model_spec] if factory_of(model_spec) is None else []  # factory_of refuses an empty MODEL
    check_output_apart(output, *bundle, *([weights] if weights else []))
    if not output.endswith(".safetensors"):
        check_replaceable(output)  # before folding: a bundle holding the user's files is refused, not emptied
    with tqdm(total=3, desc="deploy", unit="step", file=sys.stderr, disable=None) as bar:
        bar.set_postfix_str("loading")
        model = resolve_model(model_spec, weights, trust_factory=trusted())
        source = read_manifest(model_spec) if bundle else None  # whose deploy form serves as it does
        x = random_input(model, example_shape(model, input_shape, model_spec))
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
        elif source is None:
            save(deployed, output, example_inputs=x)
        else:
            save_derived(deployed, output, source, example_inputs=x)
        bar.update()
    click.echo(str(deployed.trainfer_report))
    click.echo(f"wrote {output}")
