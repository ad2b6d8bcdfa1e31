"""``trainfer serve BUNDLE [BUNDLE ...]``: the bundles over HTTP (Open Inference Protocol), dynamically batched."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import click

from trainfer.cli.common import INTERRUPTED, FiniteFloatRange, IntRange, friendly_errors, trust_factory_option, trusted
from trainfer.cli.compile import (
    SEARCH_PARAMETERS,
    check_recordable,
    check_written,
    search_options,
    search_settings,
)
from trainfer.errors import InputError, MissingFileError
from trainfer.extras import require
from trainfer.serve.runtime_names import RUNTIMES


def model_names(bundles: tuple[str, ...], names: str | None) -> dict[str, str]:
    """Model name -> bundle path: ``--names`` (comma-separated) or each bundle directory's name."""
    check_bundles_exist(bundles)
    chosen = names.split(",") if names is not None else [Path(b).resolve().name for b in bundles]
    if len(chosen) != len(bundles):
        raise InputError(f"--names gives {len(chosen)} names for {len(bundles)} bundles")
    from trainfer.server.state import check_model_name

    for name in chosen:  # before the duplicates: "--names ," is two empty names, not two equal ones
        check_model_name(name)
    if len(set(chosen)) != len(chosen):
        raise InputError(f"model names must differ; got {chosen} (name them with --names a,b)")
    return dict(zip(chosen, bundles, strict=True))


def check_bundles_exist(bundles: tuple[str, ...]) -> None:
    """Refuse a path that is no bundle directory (:class:`~trainfer.errors.MissingFileError`, naming it)."""
    for bundle in bundles:
        if not (Path(bundle) / "manifest.json").is_file():
            raise MissingFileError(f"bundle not found: {bundle!r} (expected a directory holding manifest.json)")


def ensemble_settings(
    bundles: tuple[str, ...], ensemble: str | None, weights: str | None, names: str | None, search: bool
) -> dict[str, Any]:
    """``ServerSettings``' ``ensembles`` and ``weights`` for ``--ensemble NAME [--weights W,...]``: every bundle
    given is a member of the one ensemble served (``{}`` without ``--ensemble``). Options that name or search
    separately served bundles are refused with it; the weights are checked as ``Predictor.ensemble`` checks them."""
    if ensemble is None:
        if weights is not None:
            raise InputError("--weights weighs the members of an ensemble: add --ensemble NAME")
        return {}
    if names is not None:
        raise InputError(
            "--names names separately served bundles; with --ensemble every bundle is a member: drop --names"
        )
    if search:
        raise InputError(
            "--compile searches one bundle's runtime, not an ensemble's: run `trainfer compile` on each member, "
            "then serve them with --ensemble"
        )
    from trainfer.cli.predict import parse_weights
    from trainfer.serve.ensemble import normalised_weights
    from trainfer.server.state import check_model_name

    check_model_name(ensemble)
    check_bundles_exist(bundles)
    parsed = parse_weights(weights)
    normalised_weights(parsed, len(bundles))  # refused here as Predictor.ensemble refuses them
    return {"ensembles": {ensemble: list(bundles)}, "weights": {} if parsed is None else {ensemble: parsed}}


def api_key(variable: str | None) -> str | None:
    """The API key held by the environment variable ``variable`` (never given on the command line).

    At least 16 visible ASCII characters (:func:`trainfer.server.state.check_api_key`).
    """
    from trainfer.server.state import check_api_key

    if variable is None:
        return None
    if variable not in os.environ:
        raise InputError(f"--api-key-env {variable}: no such environment variable is set (export it with the key)")
    key = os.environ[variable]
    check_api_key(key, f"--api-key-env {variable}: the variable's value")
    return key


def host_names(allowed_hosts: str | None) -> tuple[str, ...]:
    """``--allowed-hosts``' names (comma-separated), checked (:func:`trainfer.server.hosts.check_allowed_hosts`)."""
    from trainfer.server.hosts import check_allowed_hosts

    return () if allowed_hosts is None else check_allowed_hosts(allowed_hosts.split(","), "--allowed-hosts")


def compile_settings(
    bundles: dict[str, str],
    search: bool,
    write_runtime: bool,
    runtime: str | None,
    workers: int,
    values: dict[str, Any],
) -> dict[str, dict[str, Any]] | None:
    """``ServerSettings.compile`` from ``--compile`` and the search options' ``values`` (read and checked
    per bundle now, before the server starts); the search options without ``--compile`` are refused."""
    if not search:
        context = click.get_current_context()
        given = [name for name in (*SEARCH_PARAMETERS, "write_runtime") if _given(context, name)]
        if given:
            listed = ", ".join("--" + name.replace("_", "-") for name in given)
            raise InputError(f"{listed}: these options set the start-up search; add --compile")
        return None
    if runtime not in (None, "auto"):
        raise InputError(f"--compile searches the runtime (restrict it with --candidates); drop --runtime {runtime}")
    if workers > 1:
        raise InputError(
            "--compile with --workers > 1 would search once per worker, each perhaps choosing another form: "
            "run `trainfer compile BUNDLE ...` once, then `trainfer serve BUNDLE --workers N`"
        )
    if write_runtime:
        check_recordable(None, values["candidates"])
        for path in bundles.values():
            check_written(path, gated=values["gate_data"] is not None)  # before any search
    what, way_out = "trainfer serve --compile (the start-up runtime search)", "drop --compile to serve it"
    return {name: search_settings(path, trusted(), what, way_out, **values) for name, path in bundles.items()}


def check_runtime_applies(bundles: dict[str, str], runtime: str | None) -> None:
    """Refuse ``--runtime`` for an autoregressive sequence bundle (:func:`~trainfer.serve.predictor_setup.generates`)
    from its manifest, before the server starts: the refusal must come before uvicorn's "running" line."""
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.predictor_setup import generates

    if runtime is None:
        return
    for path in bundles.values():
        decoder = read_manifest(path).decoder if Path(path).is_dir() else None
        try:
            generates(None if decoder is None else decoder.model_dump(), 0, runtime)
        except InputError as error:
            raise InputError(f"--runtime {runtime} for bundle {path!r}: {error}") from None


def check_options(**values: float | None) -> None:
    """Each option of ``values`` finite and within ServerSettings' bounds (``max_body_mb``: ``max_body``'s
    in MiB), refused as one line naming the option, before anything is converted or loaded."""
    from trainfer.server.state import LIMITS, check_number

    for field, value in values.items():
        least, most = LIMITS[field] if field != "max_body_mb" else (2**-20, LIMITS["max_body"][1] / 2**20)
        check_number("--" + field.replace("_", "-"), value, least, most, integer=isinstance(value, int))


def check_port(host: str, port: int) -> None:
    """:func:`trainfer.server.run.check_address`, its message naming the way out when the port is in use."""
    from trainfer.server.run import check_address

    try:
        check_address(host, port)
    except InputError as error:
        if os.strerror(errno.EADDRINUSE) not in str(error):
            raise
        raise InputError(f"{error} (choose another with --port)") from None


def _given(context: click.Context, name: str) -> bool:
    source = context.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=IntRange(0, 65535))
@click.option(
    "--allowed-hosts",
    default=None,
    metavar="NAMES",
    help="More names requests may send in Host, comma-separated (those a proxy or DNS gives this server; '*': any, "
    "your choice: no defence against DNS rebinding). Always accepted: localhost, 127.0.0.1 and [::1] on a loopback "
    "--host, the --host address otherwise, any IP address on 0.0.0.0 or ::.",
)
@click.option("--names", default=None, help="Model names, comma-separated (default: each bundle directory's name).")
@click.option(
    "--ensemble",
    default=None,
    metavar="NAME",
    help="Serve the bundles as ONE model called NAME, their ensemble: the answers of trainfer.Predictor.ensemble "
    "(`trainfer predict A B ...`), every batch running every member.",
)
@click.option(
    "--weights",
    default=None,
    help="With --ensemble: its weights, one per bundle, comma-separated (default: equal).",
)
# The ranges below are trainfer.server.state.LIMITS' (not imported here: it loads torch and fastapi), shown by
# --help; check_options then refuses what a range lets through (nan, inf). A test keeps the two equal.
@click.option("--max-batch", default=32, show_default=True, type=IntRange(1, 65536), help="Samples per batch.")
@click.option(
    "--max-delay-ms",
    default=5.0,
    show_default=True,
    type=FiniteFloatRange(0, 60_000),
    help="How long a request waiting for a busy model may wait for others (one finding it idle runs at once).",
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=IntRange(1, 2**20),
    help="Samples waiting, per model, before 503.",
)
@click.option(
    "--max-body-mb",
    default=16.0,
    show_default=True,
    type=FiniteFloatRange(0, 2048, min_open=True),
    help="Request size limit (413).",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=FiniteFloatRange(0.001, 86_400),
    help="Seconds a request may wait (504).",
)
@click.option(
    "--header-timeout",
    default=20.0,
    show_default=True,
    type=FiniteFloatRange(0.001, 86_400),
    help="Seconds a request's start line and headers may take to arrive, from its first byte (a connection's "
    "first request: from the connection's opening); past them 408 and the connection closed.",
)
@click.option(
    "--max-connections",
    default=512,
    show_default=True,
    type=IntRange(1, 1_000_000),
    help="Requests handled at once (bodies held); the next gets 503 with Retry-After (health probes excepted).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=IntRange(1, 1024),
    help="Server processes (each loads the models).",
)
@click.option(
    "--batch-workers",
    default=None,
    type=IntRange(1, 1024),
    help="Batches of one model that may run at once, each in its own thread (default: the cores over torch's "
    "threads per forward: 1 with torch's default threads, one per core with OMP_NUM_THREADS=1).",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "recorded", *RUNTIMES]),
    default=None,
    help="Serve on this runtime (recorded, the default where the bundle has a runtime.json: what trainfer.compile "
    "chose and recorded there; auto: the fastest verified float32 one, measured now).",
)
@click.option(
    "--api-key-env",
    default=None,
    metavar="VAR",
    help="Require the key held by environment variable VAR in header X-API-Key.",
)
@click.option(
    "--compile",
    "search",
    is_flag=True,
    help="Before serving, search the fastest verified form as `trainfer compile` does (with --gate-data: bf16 "
    "and int8 too, behind the gate; not ready until done) and serve it; the options below are compile's.",
)
@click.option(
    "--write-runtime",
    is_flag=True,
    help="With --compile: also record the choice in the bundle (runtime.json, and the int8 form when int8 won), "
    "as `trainfer compile` does. Without it the bundle is left unchanged: the search is logged, and the model's "
    "metadata names the served form.",
)
@search_options
@trust_factory_option
@friendly_errors
def command(
    bundles: tuple[str, ...],
    host: str,
    port: int,
    allowed_hosts: str | None,
    names: str | None,
    ensemble: str | None,
    weights: str | None,
    max_batch: int,
    max_delay_ms: float,
    max_queue: int,
    max_body_mb: float,
    timeout: float,
    header_timeout: float,
    max_connections: int,
    workers: int,
    batch_workers: int | None,
    runtime: str | None,
    api_key_env: str | None,
    search: bool,
    write_runtime: bool,
    **search_values: Any,
) -> None:
    """Serve BUNDLE... over HTTP: the Open Inference Protocol (KServe v2) at /v2, a file endpoint,
    Prometheus metrics at /metrics and a page to try the models at /.

    A request that finds the model idle runs at once; requests arriving while it is busy run as
    one batch of at most --max-batch samples, waiting at most --max-delay-ms for others.
    SIGTERM or Ctrl-C finishes the requests in flight, then exits (after Ctrl-C with status 130).

    --ensemble NAME serves all the bundles given as one model, their ensemble (no bundle is served on
    its own then): members must agree on task, labels and input shape, as for `trainfer predict A B`.

    --compile first runs `trainfer compile`'s search on each bundle (the server is live, not ready,
    meanwhile; progress and every candidate's figures in the log) and serves the form it chose.
    """
    require("fastapi", "serve", "trainfer serve")
    require("uvicorn", "serve", "trainfer serve")
    from trainfer.server.app import ServerSettings
    from trainfer.server.run import serve

    check_options(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        timeout=timeout,
        header_timeout=header_timeout,
        batch_workers=batch_workers,
        max_body_mb=max_body_mb,
    )
    check_port(host, port)
    ensembles = ensemble_settings(bundles, ensemble, weights, names, search)
    served = {} if ensembles else model_names(bundles, names)
    check_runtime_applies(dict(zip(bundles, bundles, strict=True)) if ensembles else served, runtime)
    settings = ServerSettings(
        bundles=served,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body=max(1, int(max_body_mb * 2**20)),
        timeout=timeout,
        runtime=runtime,
        trust_factory=trusted(),
        api_key=api_key(api_key_env),
        batch_workers=batch_workers,
        max_requests=max_connections,
        header_timeout=header_timeout,
        compile=compile_settings(served, search, write_runtime, runtime, workers, search_values),
        write_runtime=write_runtime,
        host=host,
        allowed_hosts=host_names(allowed_hosts),
        **ensembles,
    )
    try:
        serve(settings, host=host, port=port, workers=workers)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once its graceful shutdown is done
        sys.exit(INTERRUPTED)
