"""``trainfer prune BUNDLE -o OUT --ratio R --data DATA``: the gated, channel-pruned deploy form of a bundle."""

from __future__ import annotations

import click
import numpy as np
import torch

from trainfer.cli.common import friendly_errors
from trainfer.cli.quantize import DATA_HELP
from trainfer.serve.gate import AccuracyGate


@click.command("prune")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The pruned bundle to write.")
@click.option("--ratio", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True,
              help="Fraction of each layer's channels to remove.")  # fmt: skip
@click.option("--data", type=click.Path(exists=True), default=None, help=f"Gate data: {DATA_HELP}.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None, help=".npy of class indices.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.99, show_default=True)
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 1), default=0.005, show_default=True, help="Fraction.")
@click.option("--round-to", type=click.IntRange(min=1), default=None, help="Keep widths multiples of this.")
@click.option("--global", "global_pruning", is_flag=True, help="Rank channels across all layers, not per layer.")
@click.option("--importance", type=click.Choice(["l2", "l1"]), default="l2", show_default=True)
@click.option("--search/--no-search", default=True, show_default=True,
              help="Exempt the most sensitive layers until the gate passes.")  # fmt: skip
@click.option("--max-exempt-layers", type=click.IntRange(min=0), default=None, help="Default: half the layers.")
@friendly_errors
def command(
    bundle: str,
    output: str,
    ratio: float,
    data: str | None,
    labels: str | None,
    min_agreement: float,
    max_accuracy_drop: float,
    round_to: int | None,
    global_pruning: bool,
    importance: str,
    search: bool,
    max_exempt_layers: int | None,
) -> None:
    """Remove the least important channels of BUNDLE's deploy form (Torch-Pruning's dependency graph,
    group magnitude), gate the result against the unpruned form, and write the bundle OUT."""
    from trainfer.serve.bundle import read_manifest, save
    from trainfer.serve.prune import prune
    from trainfer.serve.quantize import bundle_metadata  # the task, labels and preprocessing a bundle carries on

    targets = torch.from_numpy(np.load(labels, allow_pickle=False)).long() if labels else None
    pruned = prune(
        bundle,
        ratio=ratio,
        data=data,
        labels=targets,
        gate=AccuracyGate(min_agreement, max_accuracy_drop),
        round_to=round_to,
        global_pruning=global_pruning,
        importance=importance,
        search=search,
        max_exempt_layers=max_exempt_layers,
    )
    save(pruned, output, **bundle_metadata(read_manifest(bundle)))
    click.echo(str(pruned.trainfer_prune_report))
    click.echo(f"wrote {output}; serve it with: trainfer predict {output} INPUT...")
