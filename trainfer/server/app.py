"""The HTTP app of ``trainfer serve``: the Open Inference Protocol, a file endpoint, metrics and a page.

Routes (``{name}``: a served model; ``/versions/1`` may follow it, as the protocol allows):

====================================  ======  ==================================================
``/v2/health/live``                   GET     200 while the process serves HTTP
``/v2/health/ready``                  GET     200 once every model is loaded and checked, else 503
``/v2``                               GET     server metadata (name, version, extensions)
``/v2/models``                        GET     the served models and their readiness (trainfer's)
``/v2/models/{name}``                 GET     inputs and outputs: names, datatypes, shapes
``/v2/models/{name}/ready``           GET     200 when that model is ready, else 503
``/v2/models/{name}/infer``           POST    JSON (or binary) tensors in, tensors out (:mod:`.infer_route`)
``/v2/models/{name}/predict``         POST    a file's bytes in, ``trainfer predict`` JSON lines out
``/v2/models/{name}/explain``         POST    a file's bytes in, an attribution heat map out
``/metrics``                          GET     Prometheus exposition
``/``                                 GET     a page to try a model in a browser
``/docs``, ``/openapi.json``          GET     the OpenAPI schema and its viewer (:mod:`.pages`)
====================================  ======  ==================================================

Every route that answers ``GET`` answers ``HEAD`` too: the same status and headers, no body (:mod:`.head`).

Answers to mistakes are one JSON line ``{"error": "..."}``: 400 bad input (the CLI's message),
401 a missing or wrong API key, 404 an unknown model, 413 a body over the size limit, 503 overload
or not ready (with ``Retry-After``), 504 a request that waited past its timeout; 500 only for a
bug, whose traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from trainfer._version import __version__
from trainfer.analysis.attribution import Attributions
from trainfer.errors import one_line
from trainfer.serve.results import check_threshold, check_top_k, to_records
from trainfer.server.access import AccessMiddleware
from trainfer.server.error_answers import answer_errors
from trainfer.server.head import AllowHead, HeadAsGet
from trainfer.server.infer_route import InferRoute, versioned
from trainfer.server.metrics import CONTENT_TYPE_LATEST
from trainfer.server.openapi_schemas import FILE_SCHEMA, document_infer
from trainfer.server.pages import add_pages
from trainfer.server.query import EXPLAIN, PREDICT, openapi_parameters, read_query
from trainfer.server.state import Server, ServerSettings, in_turn
from trainfer.server.uploads import read_upload

logger = logging.getLogger("trainfer.server")

__all__ = ["ServerSettings", "create_app"]


def create_app(
    settings: ServerSettings,
    on_fatal: Callable[[BaseException], None] | None = None,
    background: bool = True,
    on_ready: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The ASGI app serving ``settings.bundles``; models load when its lifespan starts.

    ``background``: they load while the app already answers (live, not ready); otherwise the
    lifespan's startup waits for them (a worker process sharing a port then takes no request
    before it is ready). ``on_fatal`` hears a bundle that cannot be served (the runner stops the
    server; by default the error is logged and readiness stays false); ``on_ready`` is called once
    every model is loaded, before the app reports ready.
    """
    server = Server(settings, on_fatal or (lambda error: logger.error("cannot serve: %s", one_line(error))), on_ready)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loading = asyncio.get_running_loop().create_task(server.load_all())
        if not background:
            await loading
        yield
        loading.cancel()
        await server.stop()

    app = _App(
        server,
        title="trainfer serve",
        version=__version__,
        description="The Open Inference Protocol (KServe v2) over HTTP for trainfer bundles.",
        lifespan=lifespan,
        docs_url=None,  # trainfer.server.pages serves /docs, with a pinned Swagger UI
        redoc_url=None,  # its script floats at redoc@2 and it loads Google's fonts: not served
    )
    app.state.server = server
    _routes(app, server)
    answer_errors(app)
    return app


class _App(FastAPI):
    """FastAPI entered through four layers of trainfer's: every HTTP request passes
    :class:`AccessMiddleware` (API key, access log, metrics, a one-line 500 for a bug), then
    :class:`HeadAsGet` (a ``HEAD`` request answered as ``GET``, without the body), then
    :class:`InferRoute`, which answers the protocol's inference requests itself -- without FastAPI's
    per-request work (its telemetry check, middleware, routing; so also without FastAPI's
    OpenTelemetry spans: trainfer's metrics count them) -- and hands every other request to FastAPI
    through :class:`AllowHead` (a 405 allowing ``GET`` allows ``HEAD``; the inference route's allows
    ``POST`` only, so its requests skip it). Lifespan events go to FastAPI directly."""

    def __init__(self, server: Server, **options: Any):
        super().__init__(**options)
        self._front = AccessMiddleware(HeadAsGet(InferRoute(AllowHead(super().__call__), server)), server)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            return await self._front(scope, receive, send)
        await super().__call__(scope, receive, send)


def _routes(app: FastAPI, server: Server) -> None:
    settings = server.settings
    add_pages(app)

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: every model loaded and checked")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": server.ready}, 200 if server.ready else 503)

    @app.get("/v2", summary="Server metadata")
    async def metadata() -> dict[str, Any]:
        return {"name": "trainfer", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models", summary="Served models (trainfer's extension)")
    async def models() -> dict[str, Any]:
        return {"models": [{"name": n, "ready": n in server.batchers} for n in settings.names]}

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str = "1") -> dict[str, Any]:
        return server.model(versioned(name, version)).metadata()

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str = "1") -> JSONResponse:
        server.model(versioned(name, version))
        return JSONResponse({"name": name, "ready": True})

    document_infer(app)  # answered by InferRoute, ahead of these routes

    @app.post(
        "/v2/models/{name}/predict",
        summary="Typed predictions for a file",
        openapi_extra={**FILE_SCHEMA, **openapi_parameters(PREDICT)},
    )
    async def predict(name: str, request: Request) -> Response:
        """The file in the body (an image, a .npy array or CSV rows) -> one JSON line per sample, as
        ``trainfer predict --format jsonl`` writes them (query: :data:`~trainfer.server.query.PREDICT`)."""
        query = read_query(request.scope, PREDICT)
        filename, top_k = query["filename"], query["top_k"]
        model = server.model(name)
        check_top_k(top_k, model.predictor.heads, classes=model.classes)  # before reading the body: costs nothing
        threshold = check_threshold(query["threshold"], model.predictor.heads)
        body = await server.body(request.receive, request.headers.get("content-length"))
        content_type = request.headers.get("content-type", "")

        def prepare() -> tuple[list[str], torch.Tensor]:
            spec = model.predictor.preprocess_spec
            items = read_upload(body, filename, content_type, spec, server.settings.max_queue)
            return [i for i, _ in items], model.prepare([sample for _, sample in items])

        def lines(ids: list[str], rows: list[Any]) -> bytes:
            return _json_lines(ids, model.results(rows, top_k, threshold))

        async def answer() -> bytes:
            ids, batch = await server.decode(prepare)
            rows = await server.run(name, batch, top_k)
            # typed results (a beam search per sample for CTC), records and JSON: off the loop, a turn per core
            return await server.decode(lines, ids, rows)

        return Response(await server.bounded(answer()), media_type="application/jsonl")

    @app.post(
        "/v2/models/{name}/explain",
        summary="Attribution heat map for a file",
        openapi_extra={**FILE_SCHEMA, **openapi_parameters(EXPLAIN)},
    )
    async def explain(name: str, request: Request) -> dict[str, Any]:
        """The first sample of the file in the body, explained by integrated gradients: the absolute
        attributions summed over channels, scaled to a maximum of 1 (``heatmap``, rows of numbers), and
        ``all_zero``, true when every attribution is 0 (:func:`_all_zero`); ``target``: the class or output
        index explained (default: the predicted class; a regression model with several outputs needs it);
        504 past the request timeout, counted from the body's arrival (:meth:`Server.bounded`), one
        explanation computing at a time (``server.explaining``)."""
        query = read_query(request.scope, EXPLAIN)
        filename, target = query["filename"], query["target"]
        model = server.model(name)
        body = await server.body(request.receive, request.headers.get("content-length"))
        content_type = request.headers.get("content-type", "")
        spec = model.predictor.preprocess_spec

        async def explained() -> tuple[list[Any], Attributions]:
            items = await server.decode(read_upload, body, filename, content_type, spec, server.settings.max_queue)
            return items, await in_turn(server.explaining, model.explain, items[0][1], target)

        items, attributions = await server.bounded(explained())
        return {
            "id": items[0][0],
            "method": attributions.method,
            "heatmap": _heat_map(attributions),
            "all_zero": _all_zero(attributions),
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _json_lines(ids: list[str], results: list[Any]) -> bytes:
    """``trainfer predict --format jsonl``'s lines of ``results``, one per sample id, encoded: as long as
    the answer (60,000 lines of a 15 MB upload took 0.5-0.8 s), so built in a worker thread within the
    request timeout, never on the event loop."""
    records = zip(ids, to_records(results), strict=True)
    return "".join(json.dumps({"id": i, **r}, allow_nan=False) + "\n" for i, r in records).encode()


def _heat_map(attributions: Any) -> list[list[float]]:
    """The first example's attributions as a heat map: absolute values summed over channels, scaled
    to a maximum of 1. Never a map of nulls, nor zeros that mean nothing: ``Predictor.explain`` has
    refused non-finite scores (:class:`~trainfer.errors.NonFiniteError`, as ``/infer`` and ``/predict`` do) and
    integrated gradients that fail completeness (:class:`~trainfer.errors.ExplanationError`); a map of zeros
    is then one with nothing to attribute, flagged by :func:`_all_zero`."""
    values = attributions.values[0].detach().double().abs()
    heat = values.sum(0) if values.dim() == 3 else values.reshape(1, -1)
    return (heat / heat.max().clamp_min(1e-300)).tolist()


def _all_zero(attributions: Any) -> bool:
    """Whether every attribution of the first example is 0: integrated gradients sum to ``f(x) - f(x0)``
    (checked), so the explained score is the same at the input as at the baseline, most often because the
    preprocessed input is the baseline (zeros: the data set's mean after mean/std normalisation)."""
    return not bool(attributions.values[0].any())
