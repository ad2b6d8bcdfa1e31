"""``trainfer compile BUNDLE``: measure the runtimes that serve BUNDLE, record the fastest in its ``runtime.json``.

With ``--gate-data`` (and ``--labels``) the search also weighs bf16 and int8 forms, each behind the
accuracy gate (:mod:`trainfer.serve.gated`); without, only float32 forms. ``trainfer serve`` and
``Predictor.load(bundle, runtime="recorded")`` then serve what was recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trainfer.cli.common import friendly_errors, gate_options, trust_factory_option, trusted
from trainfer.cli.quantize import DATA_HELP, read_labels
from trainfer.serve.runtime_names import RUNTIMES


@click.command("compile")
@click.argument("bundle", type=click.Path())
@click.option("--runtime", type=click.Choice(["auto", *RUNTIMES]), default="auto", show_default=True,
              help="auto: measure every runtime and keep the fastest that passes; or serve this one.")  # fmt: skip
@click.option("--gate-data", type=click.Path(exists=True), default=None,
              help=f"Validation inputs the bf16 and int8 forms must pass the gate on: {DATA_HELP}.")  # fmt: skip
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help=".npy of class indices for --gate-data (gates the accuracy drop).")  # fmt: skip
@click.option("--calibration", type=click.Path(exists=True), default=None,
              help=f"int8 calibration data (default: --gate-data): {DATA_HELP}.")  # fmt: skip
@click.option("--candidates", type=click.Choice(RUNTIMES), multiple=True,
              help="With --runtime auto: the runtimes to measure (repeat; default: all but inductor).")  # fmt: skip
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed rounds of the paired measurement.")  # fmt: skip
@gate_options(rel_error=True)
@trust_factory_option
@friendly_errors
def command(
    bundle: str,
    runtime: str,
    gate_data: str | None,
    labels: str | None,
    calibration: str | None,
    candidates: tuple[str, ...],
    rounds: int,
    min_agreement: float,
    max_accuracy_drop: float,
    max_rel_error: float | None,
) -> None:
    """Measure the runtimes that serve BUNDLE's deploy form on this machine (paired, call by call), and
    record the fastest verified one in BUNDLE/runtime.json (with --gate-data: bf16 and int8 too, each
    behind the accuracy gate). The bundle is otherwise unchanged."""
    from trainfer.serve import gated
    from trainfer.serve.gate import AccuracyGate

    gate = AccuracyGate(min_agreement, max_accuracy_drop, max_rel_error)
    options = _gated_options(bundle, gate_data, labels, calibration)
    click.echo(f"compiling {bundle}: {'float32, bf16 and int8' if options else 'float32'} candidates...", err=True)
    options.update(gate=gate, candidates=candidates or None, rounds=rounds, trust_factory=trusted())
    compiled = gated.compile(bundle, runtime=runtime, **options)
    saved = gated.save_compiled(bundle, compiled)
    click.echo(compiled.record.table())
    record = compiled.record
    if gate_data is None and runtime == "auto":
        click.echo("bf16 and int8 were not considered: no gate data was given (--gate-data, --labels)")
    elif gate_data is not None and record.dtype == "float32":
        passed = any(c.status == "ok" and c.dtype != "float32" for c in record.candidates)
        why = (
            "bf16/int8 forms passed the gate but measured slower" if passed else "no bf16 or int8 form passed the gate"
        )
        click.echo(f"{why}: float32 stays chosen")
    click.echo(f"recorded {record.runtime}/{record.dtype} in {saved}; serve it with: trainfer serve {bundle}")


def _gated_options(bundle: str, gate_data: str | None, labels: str | None, calibration: str | None) -> dict[str, Any]:
    """``gate_data`` and ``calibration`` of :func:`trainfer.serve.gated.compile`, read from the files as the
    bundle's manifest says (``{}``: no gate data, the float32-only search); labels without data are refused."""
    from trainfer.errors import InputError
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.calibration import calibration_inputs

    manifest = read_manifest(bundle)  # also refuses a path that is not a bundle, before anything is measured
    if gate_data is None:
        if labels or calibration:
            raise InputError(
                "--labels and --calibration gate bf16/int8 forms: they need --gate-data (validation inputs)"
            )
        return {}
    inputs = calibration_inputs(gate_data, manifest)
    targets = read_labels(Path(labels)) if labels else None
    return {
        "gate_data": (inputs, targets) if targets is not None else inputs,
        "calibration": calibration_inputs(calibration, manifest) if calibration else inputs,
    }
