"""``trainfer export BUNDLE --format onnx|torchscript|exported-program -o FILE``."""

from __future__ import annotations

import click

from trainfer.cli.common import (
    Tolerance,
    check_output_apart,
    friendly_errors,
    parse_shape,
    trust_factory_option,
    trusted,
)
from trainfer.errors import EquivalenceError
from trainfer.serve.export_formats import FORMATS


@click.command("export")
@click.argument("bundle", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The file to write.")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,224,224 (default: the manifest's).")
@click.option("--rtol", type=Tolerance(), help="Max error relative to each output's scale (default per dtype).")
@trust_factory_option
@friendly_errors
def command(bundle: str, fmt: str, output: str, input_shape: str | None, rtol: float | None) -> None:
    """Export the deploy form of BUNDLE (deploying it first if needed), checked against PyTorch."""
    import torch

    from trainfer.atomic import check_target
    from trainfer.serve.export import export

    check_target(output, "--output")
    check_output_apart(output, bundle)
    example = torch.randn(parse_shape(input_shape)) if input_shape else None
    try:
        report = export(bundle, output, format=fmt, example_inputs=example, rtol=rtol, trust_factory=trusted())
    except (ImportError, EquivalenceError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(str(report))
