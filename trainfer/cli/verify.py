"""``trainfer verify REFERENCE CANDIDATE``: do two models (each a MODEL spec) compute the same?

Exit codes: 0 equivalent, 1 not equivalent (errors and first divergence printed), 2 bad input.
"""

from __future__ import annotations

import sys

import click

from trainfer.cli.common import COUNT_OR_ZERO, Tolerance, friendly_errors, trust_factory_option, trusted
from trainfer.cli.model_spec import (
    MODEL_HELP,
    example_shape,
    factory_of,
    model_argument,
    random_input,
    refuse_encoder_decoder,
    resolve_model,
    weights_option,
)
from trainfer.errors import InputError


@click.command(
    "verify",
    epilog=f"REFERENCE and CANDIDATE are each a MODEL, with --reference-weights and --candidate-weights for --weights. "
    f"{MODEL_HELP}",
)
@model_argument("reference_spec", "REFERENCE")
@model_argument("candidate_spec", "CANDIDATE")
@weights_option("--reference-weights")
@weights_option("--candidate-weights")
@click.option("--input-shape", help="Input shape with batch, e.g. 1,3,224,224 (default: REFERENCE's recorded one).")
@click.option(
    "--random-inputs",
    default=2,
    show_default=True,
    type=COUNT_OR_ZERO,
    help="Random inputs checked besides the example.",
)
@click.option("--rtol", type=Tolerance(), help="Relative tolerance (default per dtype: 1e-9 float64, 1e-5 float32).")
@click.option("--atol", type=Tolerance(zero=True), help="Absolute tolerance (default 0).")
@trust_factory_option
@friendly_errors
def command(
    reference_spec: str,
    candidate_spec: str,
    reference_weights: str | None,
    candidate_weights: str | None,
    input_shape: str | None,
    random_inputs: int,
    rtol: float | None,
    atol: float | None,
) -> None:
    """Compare CANDIDATE with REFERENCE in float64 and in REFERENCE's dtype, in eval mode."""
    import torch

    from trainfer.recipe import recipe_of
    from trainfer.reparam.verify import verify

    reference = resolve_model(
        reference_spec, reference_weights, trust_factory=trusted(), weights_flag="--reference-weights"
    )
    candidate = resolve_model(
        candidate_spec, candidate_weights, trust_factory=trusted(), weights_flag="--candidate-weights"
    )
    refuse_encoder_decoder(reference, reference_spec, "verify")
    refuse_encoder_decoder(candidate, candidate_spec, "verify")
    x = random_input(reference, example_shape(reference, input_shape, reference_spec))
    takes = getattr(recipe_of(candidate), "input_shape", None)
    if takes and tuple(takes[1:]) != tuple(x.shape[1:]):
        raise InputError(
            f"incompatible inputs: CANDIDATE {candidate_spec!r} takes samples of shape {tuple(takes[1:])}, "
            f"REFERENCE {reference_spec!r} is checked on {tuple(x.shape[1:])}: expected two models of one input"
        )
    result = verify(reference, candidate, x, rtol=rtol, atol=atol, random_inputs=random_inputs,
                    dtypes=(torch.float64, None))  # fmt: skip
    click.echo(str(result))
    if not result.ok:
        for line in _random_weights_notes(reference_spec, reference_weights, candidate_spec, candidate_weights):
            click.echo(line)
        sys.exit(1)


def _random_weights_notes(
    reference_spec: str, reference_weights: str | None, candidate_spec: str, candidate_weights: str | None
) -> list[str]:
    """One line per side that a factory built with fresh random weights (no checkpoint given for it).

    Two models of random weights differ whatever deploy did: after a failed comparison, this says so
    and which option loads the weights the other side was made from.
    """
    notes = []
    sides = (("REFERENCE", reference_spec, reference_weights), ("CANDIDATE", candidate_spec, candidate_weights))
    for side, spec, weights in sides:
        if not weights and factory_of(spec) is not None:
            notes.append(
                f"note: {side} {spec!r} was built with random initial weights (no --{side.lower()}-weights): "
                f"pass the checkpoint the other model was made from, e.g. --{side.lower()}-weights ckpt.safetensors"
            )
    return notes
