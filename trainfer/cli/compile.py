"""``trainfer compile BUNDLE``: measure the runtimes that serve BUNDLE, record the fastest in its ``runtime.json``.

With ``--gate-data`` (and ``--labels``) the search also weighs bf16 and int8 forms, each behind the
accuracy gate (:mod:`trainfer.serve.gated`); without, only float32 forms. ``trainfer serve`` and
``Predictor.load(bundle, runtime="recorded")`` then serve what was recorded. The search's options
(:func:`search_options`, :func:`search_settings`) are shared with ``trainfer serve --compile``,
which runs the same search at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from trainfer.cli.common import COUNT, THREADS, friendly_errors, gate_options, trust_factory_option, trusted
from trainfer.cli.quantize import DATA_HELP, LABELS_HELP, read_labels
from trainfer.serve.runtime_names import AUTO_RUNTIMES, CODE_GENERATING_RUNTIMES, RUNTIMES

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

#: The search parameters that are :class:`~trainfer.serve.gate.AccuracyGate`'s limits.
GATE_LIMITS = ("min_agreement", "max_accuracy_drop", "max_rel_error", "max_rms_error", "max_mae_increase")
#: The parameters :func:`search_options` adds (what :func:`search_settings` reads).
SEARCH_PARAMETERS = ("gate_data", "labels", "calibration", "candidates", "rounds", *GATE_LIMITS)


def search_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the runtime search's options (:data:`SEARCH_PARAMETERS`): gate data, labels, calibration, candidates,
    rounds and the gate's thresholds. ``trainfer compile`` and ``trainfer serve --compile`` share them."""
    options = [
        click.option("--gate-data", type=click.Path(exists=True), default=None,
                     help=f"Validation inputs the bf16 and int8 forms must pass the gate on: {DATA_HELP}."),
        click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
                     help=f"For --gate-data: {LABELS_HELP}"),
        click.option("--calibration", type=click.Path(exists=True), default=None,
                     help=f"int8 calibration data (default: --gate-data): {DATA_HELP}."),
        click.option("--candidates", type=click.Choice(RUNTIMES), multiple=True,
                     help="The runtimes to measure (repeat; default: all but inductor)."),
        click.option("--rounds", type=COUNT, default=10, show_default=True,
                     help="Timed rounds of the paired measurement."),
    ]  # fmt: skip
    command = gate_options(rel_error=True)(command)
    for option in reversed(options):
        command = option(command)
    return command


def search_settings(bundle: str, trust_factory: bool, what: str, way_out: str, **search: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`trainfer.serve.gated.compile` for ``bundle`` from the values of
    :func:`search_options` (``search``): the gate, and the gate data and calibration read as the bundle's
    manifest says (none: the float32-only search). A bundle the search cannot take
    (:func:`trainfer.serve.source.check_searchable`: ``what`` is the refused command, ``way_out`` what to do
    instead), bad files and labels without data are refused here, before anything is read or measured."""
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.gate import AccuracyGate
    from trainfer.serve.gated import check_gated_arguments
    from trainfer.serve.source import check_searchable

    manifest = read_manifest(bundle)  # also refuses a path that is not a bundle, before anything is measured
    check_searchable(manifest, search["gate_data"] is not None, what, way_out)
    gate = AccuracyGate(**{name: search[name] for name in GATE_LIMITS})
    options = _gated_options(manifest, search["gate_data"], search["labels"], search["calibration"])
    if "gate_data" in options:
        check_gated_arguments("auto", options["gate_data"], options["calibration"])
    candidates = search["candidates"]
    return {**options, "gate": gate, "candidates": candidates or None, "rounds": search["rounds"],
            "trust_factory": trust_factory}  # fmt: skip


def check_written(bundle: str, gated: bool) -> None:
    """Refuse, before any search, a file the search may write into ``bundle`` that exists and is not a
    regular file (:func:`trainfer.atomic.check_target`): ``runtime.json``, and with ``gated`` (``--gate-data``)
    the int8 form's files, which an int8 choice writes; and a ``quantization.json`` that is not a regular
    file, which saving the choice reads to decide whether an int8 form it wrote is retired
    (:func:`trainfer.serve.int8_form.compile_made`), refused in the words a load uses."""
    from trainfer.atomic import check_target
    from trainfer.readfile import present
    from trainfer.serve.int8_form import INT8_FILES, QUANTIZATION_FILE
    from trainfer.serve.runtime_record import RUNTIME_FILE

    for name in (RUNTIME_FILE, *(INT8_FILES if gated else ())):
        check_target(Path(bundle) / name)
    present(Path(bundle) / QUANTIZATION_FILE)


def check_recordable(runtime: str | None, candidates: tuple[str, ...]) -> None:
    """Refuse, before anything is measured, a search whose choice ``runtime.json`` could not record: a
    runtime that generates and compiles code when it is built runs only when named at load."""
    from trainfer.errors import InputError

    named = [name for name in (runtime, *candidates) if name in CODE_GENERATING_RUNTIMES]
    if named:
        raise InputError(
            f"{named[0]}: runtime.json records only runtimes that load without generating code "
            f"({', '.join(AUTO_RUNTIMES)}); serve it named instead: trainfer serve BUNDLE --runtime {named[0]}"
        )


@click.command("compile")
@click.argument("bundle", type=click.Path())
@click.option("--runtime", type=click.Choice(["auto", *RUNTIMES]), default="auto", show_default=True,
              help="auto: measure every runtime and keep the fastest that passes; or serve this one.")  # fmt: skip
@click.option("--threads", type=THREADS, default=None,
              help="Intra-op threads every runtime is measured and recorded with (default: torch's).")  # fmt: skip
@search_options
@trust_factory_option
@friendly_errors
def command(bundle: str, runtime: str, threads: int | None, **search: Any) -> None:
    """Measure the runtimes that serve BUNDLE's deploy form on this machine (paired, call by call), and
    record the fastest verified one in BUNDLE/runtime.json (with --gate-data: bf16 and int8 too, each
    behind the accuracy gate). The bundle is otherwise unchanged. `trainfer serve BUNDLE --compile`
    runs the same search at start-up."""
    from trainfer.errors import InputError
    from trainfer.serve import gated

    check_recordable(runtime, search["candidates"])
    check_written(bundle, gated=search["gate_data"] is not None)
    way_out = f"serve it as it is (in PyTorch): trainfer serve {bundle}"
    settings = search_settings(bundle, trusted(), "trainfer compile", way_out, **search)
    gated_search = "gate_data" in settings
    if gated_search and runtime != "auto":
        raise InputError(f"--gate-data asks compile to search bf16/int8 forms: use --runtime auto (got {runtime!r})")
    click.echo(f"compiling {bundle}: {gated.searched_kinds(settings)} candidates...", err=True)
    compiled = gated.compile(bundle, runtime=runtime, threads=threads, **settings)
    saved = gated.save_compiled(bundle, compiled)
    click.echo(compiled.record.table())
    record = compiled.record
    note = gated.choice_note(record, gated_search) if gated_search or runtime == "auto" else None
    if note:
        click.echo(note)
    click.echo(f"recorded {record.runtime}/{record.dtype} in {saved}; serve it with: trainfer serve {bundle}")


def _gated_options(
    manifest: Manifest, gate_data: str | None, labels: str | None, calibration: str | None
) -> dict[str, Any]:
    """``gate_data`` and ``calibration`` of :func:`trainfer.serve.gated.compile`, read from the files as the
    bundle's ``manifest`` says (``{}``: no gate data, the float32-only search); labels without data, or not one
    per input, are refused."""
    from trainfer.errors import InputError
    from trainfer.serve.calibration import calibration_inputs

    if gate_data is None:
        if labels or calibration:
            raise InputError(
                "--labels and --calibration gate bf16/int8 forms: they need --gate-data (validation inputs)"
            )
        return {}
    inputs = calibration_inputs(gate_data, manifest)
    targets = read_labels(Path(labels), manifest.task) if labels else None
    if targets is not None and len(targets) != len(inputs):  # named as the CLI spells it, not gate_data=
        raise InputError(f"--gate-data has {len(inputs)} inputs but --labels has {len(targets)}: one label per input")
    return {
        "gate_data": (inputs, targets) if targets is not None else inputs,
        "calibration": calibration_inputs(calibration, manifest) if calibration else inputs,
    }
