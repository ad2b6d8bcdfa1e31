"""``trainfer inspect``: per-layer output statistics, and where train and eval modes part."""

from __future__ import annotations

from pathlib import Path

import click

from trainfer.analysis.inspection_modes import MODES
from trainfer.cli.common import SEED, friendly_errors, trust_factory_option, trusted
from trainfer.cli.model_spec import (
    MODEL_HELP,
    example_shape,
    model_argument,
    random_input,
    refuse_encoder_decoder,
    resolve_model,
    weights_option,
)
from trainfer.errors import InputError


@click.command("inspect", epilog=MODEL_HELP)
@model_argument()
@weights_option()
@click.option(
    "--input-shape", help="Input shape with batch, e.g. 2,3,32,32 (default: MODEL's recorded one, batch >= 2 to train)."
)
@click.option("--modes", default="eval", show_default=True, help=f"Comma-separated modes from {', '.join(MODES)}.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the random input and of Dropout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the records here.")
@trust_factory_option
@friendly_errors
def command(
    model_spec: str,
    weights: str | None,
    input_shape: str | None,
    modes: str,
    seed: int,
    plot_path: Path | None,
    json_path: Path | None,
) -> None:
    """Print per-layer output statistics of MODEL.

    With --modes train,eval both passes run on copies with the same seeded random input, and the
    first module whose outputs differ is marked: where a forgotten eval() starts to matter.
    """
    from trainfer.analysis.inspection import inspect, train_batch_problem
    from trainfer.atomic import check_target

    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:
            check_target(path, option)  # before the model is built: /dev/full, a FIFO are refused
    model = resolve_model(model_spec, weights, trust_factory=trusted())
    refuse_encoder_decoder(model, model_spec, "inspect")
    shape = example_shape(model, input_shape, model_spec, min_batch=2 if "train" in modes else 1)
    inputs = random_input(model, shape, seed)
    problem = train_batch_problem(model, (inputs,)) if "train" in modes else None
    if problem is not None:
        sample = ",".join(str(size) for size in shape[1:])
        raise InputError(f"{problem}; pass --input-shape 2,{sample} or --modes eval")
    try:
        result = inspect(model, inputs, modes=modes, seed=seed)
    except RuntimeError as error:  # torch's own, e.g. a channel count the first conv does not take
        if click.get_current_context().find_root().params.get("debug", False):
            raise
        raise click.BadParameter(
            f"{type(model).__name__} cannot run on an input of shape {tuple(shape)}: {str(error).splitlines()[0]}",
            param_hint="--input-shape",
        ) from None
    click.echo(str(result))
    first = result.first_divergence
    if len(result.modes) == 2:
        click.echo(
            "train and eval agree at every layer"
            if first is None
            else f"first train/eval divergence: {first.name or '(model)'} ({first.type}), "
            f"relative error {first.divergence:.3g}"
        )
    if json_path is not None:
        result.to_json(json_path)
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        result.plot(plot_path)
        click.echo(f"wrote {plot_path}")
