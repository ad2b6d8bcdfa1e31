"""``trainfer audit``: mode-dependent modules, odd modes, untrained BatchNorm, forgotten-eval damage."""

from __future__ import annotations

import json

import click
import torch

from trainfer.analysis.audit import audit
from trainfer.cli.common import friendly_errors, parse_shape, trust_factory_option
from trainfer.cli.deploy import load_model
from trainfer.reparam.verify import model_dtype


@click.command("audit")
@click.argument("model_spec", metavar="MODEL")
@click.option("--weights", help="Weights to load: .safetensors, or .pt/.pth read with torch.load(weights_only=True).")
@click.option("--input-shape", help="Input shape with batch, e.g. 16,3,32,32: compares train- and eval-mode outputs.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random example inputs and of Dropout.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@trust_factory_option
@friendly_errors
def command(model_spec: str, weights: str | None, input_shape: str | None, seed: int, as_json: bool) -> None:
    """Audit MODEL (a bundle directory, or package.module:factory) for mode risks.

    Lists every module whose behaviour depends on train/eval mode, modules in another mode than
    their parent, BatchNorm layers whose running statistics were never updated, and, with
    --input-shape, how far training-mode outputs are from eval-mode outputs on random inputs.
    """
    model = load_model(model_spec, weights)
    inputs = None
    if input_shape is not None:
        dtype = model_dtype(model)
        inputs = torch.randn(parse_shape(input_shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    report = audit(model, inputs, seed=seed)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else str(report))
