"""``trainfer bench``: latency, throughput, parameters, MACs and peak memory of a model's forms."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from trainfer.cli.common import (
    BATCH_SIZE,
    COUNT,
    COUNT_OR_ZERO,
    SEED,
    THREADS,
    check_elements,
    friendly_errors,
    trust_factory_option,
    trusted,
)
from trainfer.cli.model_spec import MODEL_HELP, example_shape, factory_of, resolve_model, weights_option

DEFAULT_FORMS = "train,reparameterized,plain,deploy"


def _forms(text: str) -> list[str]:
    from trainfer.bench import FORMS

    forms = [form.strip() for form in text.split(",") if form.strip()]
    unknown = [form for form in forms if form not in FORMS]
    if not forms or unknown:
        raise click.BadParameter(
            f"expected comma-separated forms among {list(FORMS)}; got {text!r}", param_hint="--forms"
        )
    return forms


@click.command("bench", epilog=MODEL_HELP)
@click.option("--model", "spec", metavar="MODEL", default="repvgg_a0", show_default=True, help="The MODEL to measure.")
@weights_option()
@click.option("--input-shape", help="Input shape with batch 1, e.g. 1,3,224,224 (default: MODEL's recorded shape).")
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=BATCH_SIZE,
    help="Batch size of the throughput measurement (at most 2**24 input elements in all).",
)
@click.option("--forms", "forms_text", default=DEFAULT_FORMS, show_default=True, help="Forms to compare.")
@click.option("--threads", type=THREADS, help="torch intra-op threads while timing (default: torch's).")
@click.option("--rounds", default=5, show_default=True, type=COUNT, help="Interleaved rounds over the forms.")
@click.option("--repeats", default=4, show_default=True, type=COUNT, help="Timed calls per form and round.")
@click.option("--warmup", default=3, show_default=True, type=COUNT_OR_ZERO, help="Untimed calls per form first.")
@click.option(
    "--seed", default=0, show_default=True, type=SEED, help="Seed of the model's initialisation and of the inputs."
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write every figure (and samples) here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG bar chart here.")
@trust_factory_option
@friendly_errors
def command(
    spec: str,
    weights: str | None,
    input_shape: str | None,
    batch_size: int,
    forms_text: str,
    threads: int | None,
    rounds: int,
    repeats: int,
    warmup: int,
    seed: int,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Compare the forms of a model: train (in eval), reparameterized, plain convs, deploy.

    Prints a table of median/p90 latency at batch 1, throughput at --batch-size, parameters,
    multiply-adds and peak memory, with the latency ratios measured in the same run.
    """
    import torch

    from trainfer.atomic import check_target
    from trainfer.bench import benchmark

    forms = _forms(forms_text)
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path:
            check_target(path, option)  # before the model is built: /dev/full, a FIFO are refused
    torch.manual_seed(seed)
    model = resolve_model(spec, weights, trust_factory=trusted())
    shape = example_shape(model, input_shape, spec)
    _check_batch_elements(batch_size, shape, input_shape is not None)
    report = benchmark(
        model,
        shape,
        forms=forms,
        batch_size=batch_size,
        rounds=rounds,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        name=factory_of(spec) or spec,
    )
    click.echo(report.table())
    if json_path:
        _write(Path(json_path), lambda path: path.write_text(json.dumps(report.to_dict(), indent=2)))
        click.echo(f"wrote {json_path}")
    if plot_path:
        _write(Path(plot_path), lambda path: report.plot().savefig(path, format="png", dpi=120))
        click.echo(f"wrote {plot_path}")


def _check_batch_elements(batch_size: int, shape: tuple[int, ...], shape_given: bool) -> None:
    """Refuse a throughput batch (``batch_size`` samples of ``shape``'s sample) over the elements an input
    may have, naming the options that made it: ``--batch-size`` when the user gave it, ``--input-shape``
    when the user gave that (with the default batch size when it is the default that multiplies it)."""
    batch_given = click.get_current_context().get_parameter_source("batch_size") is not ParameterSource.DEFAULT
    named = (("--batch-size", batch_given or not shape_given), ("--input-shape", shape_given))
    default = "" if batch_given else f" (the default --batch-size {batch_size})"
    given = f"{batch_size} samples{default} of shape {tuple(shape[1:])}"
    check_elements((batch_size, *shape[1:]), given, " / ".join(f"'{option}'" for option, blamed in named if blamed))


def _write(target: Path, writer: Callable[[Path], object]) -> None:
    """Write through a temporary file that replaces ``target`` only once complete."""
    from trainfer.atomic import atomic_file

    with atomic_file(target) as temporary:
        writer(temporary)
