"""``trainfer inspect``: per-layer output statistics, and where train and eval modes part."""

from __future__ import annotations

from pathlib import Path

import click
import torch
from torch import nn

from trainfer.analysis.inspection import MODES, inspect
from trainfer.cli.common import friendly_errors, load_factory, parse_shape, trust_factory_option, trusted
from trainfer.reparam.verify import model_dtype


@click.command("inspect")
@click.argument("model_spec", metavar="MODEL")
@click.option(
    "--input-shape", help="Input shape with batch, e.g. 2,3,32,32 (default for a bundle: its recorded shape)."
)
@click.option("--modes", default="eval", show_default=True, help=f"Comma-separated modes from {', '.join(MODES)}.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random input and of Dropout.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the records here.")
@trust_factory_option
@friendly_errors
def command(
    model_spec: str, input_shape: str | None, modes: str, seed: int, plot_path: Path | None, json_path: Path | None
) -> None:
    """Print per-layer output statistics of MODEL (package.module:factory or a bundle path).

    With --modes train,eval both passes run on copies with the same seeded random input, and the
    first module whose outputs differ is marked: where a forgotten eval() starts to matter.
    """
    model, shape = _load(model_spec, input_shape, train_pass="train" in modes)
    generator = torch.Generator().manual_seed(seed)
    dtype = model_dtype(model)
    inputs = torch.randn(shape, generator=generator, dtype=dtype)
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


def _load(model_spec: str, input_shape: str | None, train_pass: bool) -> tuple[nn.Module, tuple[int, ...]]:
    """A model from a bundle directory or a ``package.module:factory``, and the input shape to use.

    A bundle's own input shape gets a batch of at least 2 when a train-mode pass runs (BatchNorm).
    """
    shape = parse_shape(input_shape) if input_shape is not None else None
    if not Path(model_spec).exists():
        if shape is None:
            raise click.BadParameter("--input-shape is required for a package.module:factory model")
        return load_factory(model_spec)(), shape
    from trainfer.serve.bundle import load

    model = load(model_spec, trust_factory=trusted())
    if shape is None:
        recorded = (getattr(model, "trainfer_config", None) or {}).get("input_shape")
        if not recorded:
            raise click.BadParameter(f"bundle {model_spec} records no input shape; pass --input-shape")
        shape = (max(recorded[0], 2 if train_pass else 1), *recorded[1:])
    return model, shape
