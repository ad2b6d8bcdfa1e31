"""``trainfer prune BUNDLE -o OUT --ratio R --data DATA``: the gated, channel-pruned deploy form of a bundle.

``--finetune-epochs N`` trains each pruned candidate before the gate with the built-in loop
(:class:`trainfer.serve.finetune.FinetuneLoop`: cross-entropy, Adam or SGD) on ``--finetune-data``
and ``--finetune-labels`` (default: the gate's ``--data`` and ``--labels``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trainfer.cli.common import (
    BATCH_SIZE,
    COUNT_OR_ZERO,
    FiniteFloatRange,
    IntRange,
    check_output_apart,
    friendly_errors,
    gate_options,
    trust_factory_option,
    trusted,
)
from trainfer.cli.quantize import DATA_HELP, LABELS_HELP, read_labels
from trainfer.errors import InputError

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest


@click.command("prune")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The pruned bundle to write.")
@click.option("--ratio", type=FiniteFloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of each layer's channels to remove.")  # fmt: skip
@click.option("--data", type=click.Path(exists=True), default=None, help=f"Gate data: {DATA_HELP}.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help=LABELS_HELP)
@gate_options()
# 4096: trainfer.serve.manifest.MAX_CHANNELS, the most a bundle records (not imported here: it loads pydantic)
@click.option("--round-to", type=IntRange(1, 4096), default=None, help="Keep widths multiples of this.")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across all layers, not per layer.")
@click.option("--importance", type=click.Choice(["l2", "l1"]), default="l2", show_default=True)
@click.option("--search/--no-search", default=True, show_default=True,
              help="Exempt the most sensitive layers until the gate passes.")  # fmt: skip
@click.option("--max-exempt-layers", type=IntRange(min=0), default=None, help="Default: half the layers.")
@click.option("--finetune-epochs", type=COUNT_OR_ZERO, default=0, show_default=True,
              help="Fine-tune each pruned candidate this many epochs before the gate (cross-entropy).")  # fmt: skip
@click.option("--finetune-data", type=click.Path(exists=True), default=None,
              help=f"Fine-tuning inputs (default: --data): {DATA_HELP}.")  # fmt: skip
@click.option("--finetune-labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help=".npy of class indices for --finetune-data (default: --labels).")  # fmt: skip
@click.option("--finetune-lr", type=FiniteFloatRange(min=0, max=10, min_open=True), default=1e-3, show_default=True)
@click.option("--finetune-optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
              help="Adam, or SGD with momentum 0.9.")  # fmt: skip
@click.option("--finetune-batch-size", type=BATCH_SIZE, default=64, show_default=True)
@trust_factory_option
@friendly_errors
def command(
    bundle: str,
    output: str,
    ratio: float,
    data: str | None,
    labels: str | None,
    min_agreement: float,
    max_accuracy_drop: float,
    max_rms_error: float,
    max_mae_increase: float,
    round_to: int | None,
    global_pruning: bool,
    importance: str,
    search: bool,
    max_exempt_layers: int | None,
    finetune_epochs: int,
    finetune_data: str | None,
    finetune_labels: str | None,
    finetune_lr: float,
    finetune_optimizer: str,
    finetune_batch_size: int,
) -> None:
    """Remove the least important channels of BUNDLE's deploy form (Torch-Pruning's dependency graph,
    group magnitude), optionally fine-tune, gate the result against the unpruned form, and write OUT."""
    from trainfer.atomic import check_target
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.bundle_write import check_replaceable, save_derived
    from trainfer.serve.gate import AccuracyGate
    from trainfer.serve.prune import prune

    check_target(output, "--output", directory=True)
    check_output_apart(output, bundle, *(p for p in (data, labels, finetune_data, finetune_labels) if p))
    check_replaceable(output)  # before pruning: a bundle holding the user's files is refused, not emptied
    manifest = read_manifest(bundle)
    loop = {
        "epochs": finetune_epochs,
        "lr": finetune_lr,
        "optimizer": finetune_optimizer,
        "batch_size": finetune_batch_size,
    }
    finetune = (
        _finetune_loop(manifest, (finetune_data, finetune_labels), (data, labels), loop) if finetune_epochs else None
    )
    pruned = prune(
        bundle,
        ratio=ratio,
        data=data,
        labels=read_labels(Path(labels), manifest.task) if labels else None,
        gate=AccuracyGate(min_agreement, max_accuracy_drop, None, max_rms_error, max_mae_increase),
        finetune=finetune,
        round_to=round_to,
        global_pruning=global_pruning,
        importance=importance,
        search=search,
        max_exempt_layers=max_exempt_layers,
        trust_factory=trusted(),
    )
    save_derived(pruned, output, manifest)
    click.echo(str(pruned.trainfer_prune_report))
    click.echo(f"wrote {output}; serve it with: trainfer predict {output} INPUT...")


def _finetune_loop(
    manifest: Manifest,
    given: tuple[str | None, str | None],
    gate: tuple[str | None, str | None],
    options: dict[str, Any],
) -> Any:
    """The built-in loop on the ``given`` (inputs, labels) files, else the ``gate``'s, read as the gate's
    data is; it echoes each epoch."""
    from trainfer.serve.calibration import calibration_inputs
    from trainfer.serve.finetune import FinetuneLoop

    inputs, labels = given[0] or gate[0], given[1] or gate[1]
    if inputs is None or labels is None:
        raise InputError("--finetune-epochs needs labelled data: --finetune-data and --finetune-labels (or --data)")
    if given[0] is None:
        click.echo(
            "note: fine-tuning on the gate's data (--data), so the gate measures on data the model was tuned on; "
            "pass held-out --data, or --finetune-data and --finetune-labels",
            err=True,
        )
    samples, targets = calibration_inputs(inputs, manifest), read_labels(Path(labels))
    return FinetuneLoop(samples, targets, **options, progress=lambda record: click.echo(str(record)))
