"""``trainfer quantize BUNDLE --calibration DATA -o OUT``: the accuracy-gated int8 form of a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from trainfer.cli.common import (
    IntRange,
    check_output_apart,
    friendly_errors,
    gate_options,
    trust_factory_option,
    trusted,
)
from trainfer.errors import InputError

if TYPE_CHECKING:  # imported when a command runs, never for --help
    import torch

#: ``--equalize`` -> the ``equalize`` argument of :func:`trainfer.quantize`.
EQUALIZE: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}

DATA_HELP = (
    "raw inputs: a .npy, .csv or image file, or a directory of images/.npy files (preprocessed as the manifest says)"
)


def read_labels(path: Path) -> torch.Tensor:
    """``--labels``: a ``.npy`` file of integer class indices (read as any trainfer ``.npy`` input)."""
    from trainfer.serve.preprocess import PreprocessSpec, as_tensor
    from trainfer.serve.readers import read_npy

    if path.suffix.lower() != ".npy":
        raise InputError(f"--labels {str(path)!r}: expected a .npy file of integer class indices")
    array = read_npy(path, PreprocessSpec())
    if array.dtype.kind not in "iu":
        raise InputError(f"--labels {str(path)!r}: expected integer class indices, got numpy dtype {array.dtype}")
    return as_tensor(array).long()  # uint64 above the largest int64 refused, never wrapped to a negative index


@click.command("quantize")
@click.argument("bundle", type=click.Path())
@click.option("--calibration", required=True, type=click.Path(exists=True), help=f"Calibration data: {DATA_HELP}.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The int8 bundle to write.")
@click.option("--validation", type=click.Path(exists=True), default=None, help="Gate data (default: calibration).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help=".npy of class indices.")
@gate_options(rel_error=True)
@click.option("--max-float-layers", type=IntRange(min=0), default=None, help="Default: half the layers.")
@click.option("--equalize", type=click.Choice(list(EQUALIZE)), default="auto", show_default=True)
@click.option(
    "--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True
)
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "openvino"]),
    default="onnxruntime",
    show_default=True,
    help="The runtime the int8 file is made for: where its quantizers go, where the gate runs, what serves it.",
)
@trust_factory_option
@friendly_errors
def command(
    bundle: str,
    calibration: str,
    output: str,
    validation: str | None,
    labels: str | None,
    min_agreement: float,
    max_accuracy_drop: float,
    max_rel_error: float | None,
    max_float_layers: int | None,
    equalize: str,
    calibration_method: str,
    runtime: str,
) -> None:
    """Quantize the deploy form of BUNDLE to int8 (QDQ, per-channel weights, for --runtime), keep the
    most sensitive layers in float until the accuracy gate passes, and write the bundle OUT."""
    from trainfer.atomic import check_target
    from trainfer.serve.bundle_write import check_replaceable
    from trainfer.serve.gate import AccuracyGate
    from trainfer.serve.quantize import quantize

    check_target(output, "--output", directory=True)
    check_output_apart(output, bundle, *(p for p in (calibration, validation, labels) if p))
    check_replaceable(output)  # before quantizing: a bundle holding the user's files is refused, not emptied
    targets = read_labels(Path(labels)) if labels else None
    result = quantize(
        bundle,
        calibration,
        validation=validation,
        labels=targets,
        gate=AccuracyGate(min_agreement, max_accuracy_drop, max_rel_error),
        equalize=EQUALIZE[equalize],
        max_float_layers=max_float_layers,
        calibration=calibration_method,
        runtime=runtime,
        trust_factory=trusted(),
    )
    result.save(output)
    click.echo(str(result.report))
    click.echo(
        f"wrote {output} (float deploy form + quantized.onnx); serve it with: trainfer predict {output} INPUT..."
    )
