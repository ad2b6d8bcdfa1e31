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

LABELS_HELP = ".npy of class indices (0/1 for a binary model), or of real-valued targets for a regression model."


def read_labels(path: Path, task: str | None = None) -> torch.Tensor:
    """``--labels``: a ``.npy`` file (read as any trainfer ``.npy`` input) of integer class indices (0/1 for a
    binary model), or of real-valued targets for a regression model (``task``: the bundle's task)."""
    from trainfer.serve.preprocess import PreprocessSpec, as_tensor
    from trainfer.serve.readers import read_npy

    regression = task == "regression"
    what = "real-valued targets" if regression else "integer class indices"
    if path.suffix.lower() != ".npy":
        raise InputError(f"--labels {str(path)!r}: expected a .npy file of {what}")
    array = read_npy(path, PreprocessSpec())
    if array.dtype.kind not in ("iuf" if regression else "iu"):
        raise InputError(f"--labels {str(path)!r}: expected {what}, got numpy dtype {array.dtype}")
    values = as_tensor(array)  # uint64 above the largest int64 refused, never wrapped to a negative index
    return values.double() if regression else values.long()


@click.command("quantize")
@click.argument("bundle", type=click.Path())
@click.option("--calibration", required=True, type=click.Path(exists=True), help=f"Calibration data: {DATA_HELP}.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The int8 bundle to write.")
@click.option("--validation", type=click.Path(exists=True), default=None, help="Gate data (default: calibration).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help=LABELS_HELP)
@gate_options(rel_error=True)
@click.option(
    "--reference", type=click.Path(exists=True, file_okay=False), default=None,
    help="The bundle the gate compares with (default: BUNDLE), e.g. the original a pruned BUNDLE was made from.",
)  # fmt: skip
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
    max_rms_error: float,
    max_mae_increase: float,
    reference: str | None,
    max_float_layers: int | None,
    equalize: str,
    calibration_method: str,
    runtime: str,
) -> None:
    """Quantize the deploy form of BUNDLE to int8 (QDQ, per-channel weights, for --runtime), keep the
    most sensitive layers in float until the accuracy gate passes, and write the bundle OUT."""
    from trainfer.atomic import check_target
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.bundle_write import check_replaceable
    from trainfer.serve.gate import AccuracyGate
    from trainfer.serve.quantize import quantize

    check_target(output, "--output", directory=True)
    check_output_apart(output, bundle, *(p for p in (calibration, validation, labels, reference) if p))
    check_replaceable(output)  # before quantizing: a bundle holding the user's files is refused, not emptied
    targets = read_labels(Path(labels), read_manifest(bundle).task) if labels else None
    result = quantize(
        bundle,
        calibration,
        validation=validation,
        labels=targets,
        gate=AccuracyGate(min_agreement, max_accuracy_drop, max_rel_error, max_rms_error, max_mae_increase),
        equalize=EQUALIZE[equalize],
        max_float_layers=max_float_layers,
        calibration=calibration_method,
        runtime=runtime,
        reference=reference,
        trust_factory=trusted(),
    )
    result.save(output)
    click.echo(str(result.report))
    click.echo(
        f"wrote {output} (float deploy form + quantized.onnx); serve it with: trainfer predict {output} INPUT..."
    )
