"""``trainfer demo``: the whole story on the embedded digits data, in about two minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import click

from trainfer.cli.common import friendly_errors


def _positive(context: click.Context, parameter: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < (0 if parameter.name == "epochs" else 1):
        raise click.BadParameter(
            f"expected {'>= 0' if parameter.name == 'epochs' else 'a positive number'}; got {value}"
        )
    return value


@click.command("demo")
@click.option(
    "--out",
    default=Path("runs/demo"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory; replaced only after a successful run.",
)
@click.option("--epochs", default=15, show_default=True, callback=_positive, help="Training epochs.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialisation, shuffling, augmentation, Dropout.")
@click.option("--subset", type=int, callback=_positive, help="Train on the first N training images only (quick runs).")
@click.option("--repeats", default=30, show_default=True, callback=_positive, help="Timed calls per latency figure.")
@friendly_errors
def command(out: Path, epochs: int, seed: int, subset: int | None, repeats: int) -> None:
    """Train digits_net, deploy it, prove both forms agree, measure them, and write a report.

    Under `torchrun --nproc_per_node N -m trainfer demo` training runs on N processes (DDP);
    rank 0 does the rest.
    """
    from trainfer.demo import DemoOptions, run

    run(DemoOptions(out=out, epochs=epochs, seed=seed, subset=subset, repeats=repeats), echo=click.echo)
