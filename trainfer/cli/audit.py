"""``trainfer audit``: mode-dependent modules, odd modes, untrained BatchNorm, forgotten-eval damage."""

from __future__ import annotations

import json

import click

from trainfer.cli.common import SEED, friendly_errors, parse_shape, trust_factory_option, trusted
from trainfer.cli.model_spec import MODEL_HELP, model_argument, random_input, resolve_model, weights_option


@click.command("audit", epilog=MODEL_HELP)
@model_argument()
@weights_option()
@click.option("--input-shape", help="Input shape with batch, e.g. 16,3,32,32: compares train- and eval-mode outputs.")
@click.option(
    "--seed", default=0, show_default=True, type=SEED, help="Seed of the random example inputs and of Dropout."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@trust_factory_option
@friendly_errors
def command(model_spec: str, weights: str | None, input_shape: str | None, seed: int, as_json: bool) -> None:
    """Audit MODEL for mode risks.

    Lists every module whose behaviour depends on train/eval mode, modules in another mode than
    their parent, BatchNorm layers whose running statistics were never updated, and, with
    --input-shape, how far training-mode outputs are from eval-mode outputs on random inputs.
    MODEL is audited in eval mode, the mode it serves in: a factory or a training bundle builds it
    in training mode, which is the command's doing, not a risk of yours.
    """
    from trainfer.analysis.audit import audit

    model = resolve_model(model_spec, weights, trust_factory=trusted()).eval()
    inputs = None if input_shape is None else random_input(model, parse_shape(input_shape), seed)
    report = audit(model, inputs, seed=seed)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else str(report))
