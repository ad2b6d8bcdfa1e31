"""Running the app on uvicorn: one process, or ``workers`` processes sharing the port.

SIGTERM (and Ctrl-C) shut down gracefully: the server stops accepting connections, answers the
requests already received (the batchers finish their queues), then ends as the signal ends a
process (Ctrl-C: with ``KeyboardInterrupt``, which the CLI turns into 130), with
one worker process or many (:mod:`trainfer.server.supervisor`, which also stops the workers of a
supervisor that was killed). A bundle that cannot be served stops the server, and :func:`serve`
raises its error (the CLI prints it in one line).

Once the models are loaded, the process's objects so far (torch, the models, the app: some
300 000) are moved out of the garbage collector's sight (:func:`freeze_heap`): otherwise every
full collection, triggered by the allocations of the requests, walks them all and holds the
event loop for 0.1-1 s -- the latency tail of a loaded server.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import socket
import sys
from typing import Any

from trainfer.errors import InputError
from trainfer.server.app import ServerSettings, create_app
from trainfer.server.state import load_served
from trainfer.server.supervisor import exit_with_parent, supervise, thread_locks_for_progress_bars

__all__ = [
    "SETTINGS_VARIABLE",
    "WORKER_HEALTH_CHECK_SECONDS",
    "app_from_environment",
    "check_address",
    "check_bundles",
    "freeze_heap",
    "serve",
]

#: How the settings reach worker processes (uvicorn imports the app by name in each of them).
SETTINGS_VARIABLE = "TRAINFER_SERVE_SETTINGS"
#: Seconds added to the request timeout for a graceful shutdown before connections are dropped.
SHUTDOWN_GRACE = 5.0
#: Seconds a ``--workers`` process may take to answer its supervisor's health check (uvicorn's ping,
#: every half second) before uvicorn kills and replaces it. uvicorn's 5 s killed workers still
#: importing torch and loading their bundle on a busy machine, three in a row (2 cores, load 4-5), so
#: that the server restarted its workers instead of serving; a hung worker is replaced after this long.
WORKER_HEALTH_CHECK_SECONDS = 60


def check_address(host: str, port: int) -> None:
    """Refuse (:class:`InputError`) a ``host`` that does not resolve or a ``host:port`` that cannot be
    bound now (in use, not this machine's), by binding it once, as uvicorn will."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as error:
        raise InputError(f"--host {host!r}: not an address or a name that resolves ({error})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed port's TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve(
    settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, **uvicorn: Any
) -> None:
    """Serve ``settings`` on ``host:port`` until SIGTERM or Ctrl-C (``uvicorn``: more ``uvicorn.Config`` options);
    the requests' ``Host`` is checked against ``host`` and ``settings.allowed_hosts`` (:mod:`trainfer.server.hosts`)."""
    import uvicorn as engine

    from trainfer.server.header_limit import BoundedHeadersProtocol

    check_address(host, port)  # before the models load: a wrong address is known at once
    settings = dataclasses.replace(settings, host=host)
    _log_access()
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,  # ours is structured: trainfer.server.access
        "timeout_graceful_shutdown": settings.timeout + SHUTDOWN_GRACE,
        # a backstop: trainfer's access layer answers 503 with Retry-After past max_requests; past
        # twice that, uvicorn refuses connections itself (a plain-text 503)
        "limit_concurrency": 2 * settings.max_requests,
        "log_level": "info",
        # httptools, with bounds on a request's head, its size and its time (the workers' too)
        "http": functools.partial(BoundedHeadersProtocol, header_timeout=settings.header_timeout),
        # no WebSocket protocol: trainfer serves none, and the library's own refusal (a bare 403) would
        # bypass the headers of every answer; an Upgrade request is answered as the plain HTTP one it is
        "ws": "none",
        **uvicorn,
    }
    if workers > 1:  # each worker loads the models: a bundle that cannot be served fails here, once
        check_bundles(settings)
        os.environ[SETTINGS_VARIABLE] = json.dumps(dataclasses.asdict(settings))
        config = engine.Config(
            f"{__name__}:app_from_environment",
            factory=True,
            workers=workers,
            timeout_worker_healthcheck=WORKER_HEALTH_CHECK_SECONDS,
            **options,
        )
        supervise(config)
        return
    failures: list[BaseException] = []
    server: Any = None

    def stop(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    server = engine.Server(engine.Config(create_app(settings, on_fatal=stop, on_ready=freeze_heap), **options))
    server.run()
    if failures:
        raise failures[0]


def check_bundles(settings: ServerSettings) -> None:
    """Load and check every model of ``settings`` (raises what a worker would meet)."""
    for name in settings.names:
        load_served(settings, name)


def freeze_heap() -> None:
    """Collect the garbage of the start-up, then exempt every surviving object from later collections
    (:func:`gc.freeze`: they are long-lived -- modules, models, the app -- and still freed by reference
    counting; only cycles among them are never collected). Called once the models are loaded."""
    gc.collect()
    gc.freeze()


def app_from_environment() -> Any:
    """The app of a worker process, from the settings its parent put in ``TRAINFER_SERVE_SETTINGS``;
    the worker shuts down when its parent, the supervisor, dies (:func:`exit_with_parent`), and its
    progress bars make no semaphore (:func:`thread_locks_for_progress_bars`)."""
    exit_with_parent()
    thread_locks_for_progress_bars()
    _log_access()
    settings = ServerSettings(**json.loads(os.environ[SETTINGS_VARIABLE]))

    def stop(error: BaseException) -> None:
        from uvicorn.config import STARTUP_FAILURE

        logging.getLogger("trainfer.server").error("cannot serve: %s", error)
        os._exit(STARTUP_FAILURE)  # the supervisor stops (no worker is restarted) and the user sees why

    return create_app(settings, on_fatal=stop, background=False, on_ready=freeze_heap)


def _log_access() -> None:
    """Structured access logs (one JSON object a line) and server messages on stderr.

    This process serves and nothing else, so its log records skip what no line of ours prints
    (the calling thread, process and source line: the logging HOWTO's "Optimization" switches),
    which halves the cost of the access log's record per request.
    """
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    logger = logging.getLogger("trainfer.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
