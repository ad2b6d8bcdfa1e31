"""The HTTP app of ``trainfer serve``: the Open Inference Protocol, a file endpoint, metrics and a page.

Routes (``{name}``: a served model; ``/versions/1`` may follow it, as the protocol allows):

====================================  ======  ==================================================
``/v2/health/live``                   GET     200 while the process serves HTTP
``/v2/health/ready``                  GET     200 once every model is loaded and checked, else 503
``/v2``                               GET     server metadata (name, version, extensions)
``/v2/models``                        GET     the served models and their readiness (trainfer's)
``/v2/models/{name}``                 GET     inputs and outputs: names, datatypes, shapes
``/v2/models/{name}/ready``           GET     200 when that model is ready, else 503
``/v2/models/{name}/infer``           POST    JSON (or binary) tensors in, tensors out
``/v2/models/{name}/predict``         POST    a file's bytes in, ``trainfer predict`` JSON lines out
``/v2/models/{name}/explain``         POST    a file's bytes in, an attribution heat map out
``/metrics``                          GET     Prometheus exposition
``/``                                 GET     a page to try a model in a browser
``/docs``, ``/openapi.json``          GET     the OpenAPI schema and its viewer
====================================  ======  ==================================================

Answers to mistakes are one JSON line ``{"error": "..."}``: 400 bad input (the CLI's message),
401 a missing or wrong API key, 404 an unknown model, 413 a body over the size limit, 503 overload
or not ready (with ``Retry-After``), 504 a request that waited past its timeout; 500 only for a
bug, whose traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from trainfer._version import __version__
from trainfer.errors import InputError, MissingExtraError, TrainferError, one_line
from trainfer.serve.results import to_records
from trainfer.server.batching import DynamicBatcher, Overloaded
from trainfer.server.metrics import CONTENT_TYPE_LATEST, Metrics
from trainfer.server.model import ServedModel, load_model
from trainfer.server.protocol import HEADER_LENGTH, decode_request, encode_response
from trainfer.server.uploads import read_upload

logger = logging.getLogger("trainfer.server")
access_logger = logging.getLogger("trainfer.server.access")

__all__ = ["ServerSettings", "create_app"]

API_KEY_HEADER = "x-api-key"
#: Request bodies up to this size are decoded on the event loop (a thread hop would cost more than
#: the decoding); larger ones in a worker thread, so that the loop keeps answering meanwhile.
INLINE_BYTES = 64 * 1024
_OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"})


@dataclass(frozen=True)
class ServerSettings:
    """What ``trainfer serve`` was asked to serve, and its limits.

    ``bundles`` maps model names to bundle paths; ``max_queue`` bounds the samples waiting per
    model; ``max_body`` the bytes of one request; ``timeout`` the seconds one request may wait
    for its answer; ``api_key`` (when set) must be sent in the ``X-API-Key`` header.
    """

    bundles: dict[str, str]
    max_batch: int = 32
    max_delay_ms: float = 5.0
    max_queue: int = 256
    max_body: int = 16 * 2**20
    timeout: float = 30.0
    runtime: str | None = None
    trust_factory: bool = False
    api_key: str | None = None
    retry_after: int = 1


class HTTPError(Exception):
    """An answer other than 200, with its one-line message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class Server:
    """The served models, their batchers and the metrics of one app."""

    def __init__(self, settings: ServerSettings, on_fatal: Callable[[BaseException], None]):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch)
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.on_fatal = on_fatal
        self.explaining = asyncio.Lock()  # one explanation at a time: each runs the model dozens of times

    @property
    def ready(self) -> bool:
        return len(self.batchers) == len(self.settings.bundles)

    async def load_all(self) -> None:
        """Load and check every bundle, in order, off the event loop; a failure stops the server."""
        settings = self.settings
        try:
            for name, path in settings.bundles.items():
                model = await asyncio.to_thread(
                    load_model,
                    name,
                    path,
                    runtime=settings.runtime,
                    trust_factory=settings.trust_factory,
                    max_batch=settings.max_batch,
                )
                batcher = DynamicBatcher(
                    model.scores,
                    settings.max_batch,
                    settings.max_delay_ms / 1000,
                    settings.max_queue,
                    self.metrics.batch_stats(name),
                )
                batcher.start()
                self.models[name] = model
                self.batchers[name] = batcher
                logger.info("model %r ready (%s)", name, path)
        except Exception as error:  # a bundle that cannot be served: say why in one line and stop
            self.on_fatal(error)

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    def model(self, name: str) -> ServedModel:
        if name not in self.settings.bundles:
            raise HTTPError(404, f"unknown model {name!r}: this server serves {list(self.settings.bundles)}")
        if name not in self.batchers:
            raise HTTPError(503, f"model {name!r} is still loading", {"Retry-After": str(self.settings.retry_after)})
        return self.models[name]

    async def run(self, name: str, batch: torch.Tensor) -> list[torch.Tensor]:
        """``batch``'s rows of every output, through the model's dynamic batcher, within the timeout."""
        if not len(batch):
            raise InputError("empty input: expected at least one sample")
        try:
            return await asyncio.wait_for(self.batchers[name].submit(batch), self.settings.timeout)
        except Overloaded as error:
            raise HTTPError(503, f"overloaded: {error}; retry later", self._retry()) from None
        except TimeoutError:
            raise HTTPError(504, f"no answer within the request timeout of {self.settings.timeout:g} s") from None

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after)}

    async def body(self, request: Request) -> bytes:
        """The request's body, refused with 413 as soon as it exceeds ``max_body`` bytes."""
        limit = self.settings.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def create_app(
    settings: ServerSettings, on_fatal: Callable[[BaseException], None] | None = None, background: bool = True
) -> FastAPI:
    """The ASGI app serving ``settings.bundles``; models load when its lifespan starts.

    ``background``: they load while the app already answers (live, not ready); otherwise the
    lifespan's startup waits for them (a worker process sharing a port then takes no request
    before it is ready). ``on_fatal`` hears a bundle that cannot be served (the runner stops the
    server; by default the error is logged and readiness stays false).
    """
    server = Server(settings, on_fatal or (lambda error: logger.error("cannot serve: %s", one_line(error))))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loading = asyncio.get_running_loop().create_task(server.load_all())
        if not background:
            await loading
        yield
        loading.cancel()
        await server.stop()

    app = FastAPI(
        title="trainfer serve",
        version=__version__,
        description="The Open Inference Protocol (KServe v2) over HTTP for trainfer bundles.",
        lifespan=lifespan,
    )
    app.state.server = server
    _routes(app, server)
    _errors(app)
    app.add_middleware(_Access, server=server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    settings = server.settings

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("trainfer.server").joinpath("static/index.html").read_text("utf-8"))

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
        return {"models": [{"name": n, "ready": n in server.batchers} for n in settings.bundles]}

    @app.get("/v2/models/{name}", summary="Model metadata")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str = "1") -> dict[str, Any]:
        return server.model(_versioned(name, version)).metadata()

    @app.get("/v2/models/{name}/ready", summary="Model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str = "1") -> JSONResponse:
        server.model(_versioned(name, version))
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/models/{name}/infer", summary="Inference (Open Inference Protocol)", openapi_extra=_INFER_SCHEMA)
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str = "1") -> Response:
        model = server.model(_versioned(name, version))
        body = await server.body(request)

        def decode() -> tuple[Any, torch.Tensor]:
            decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
            if set(decoded.inputs) != {model.input_name}:
                raise InputError(
                    f"model {name!r} takes one input named {model.input_name!r}; got {list(decoded.inputs)}"
                )
            return decoded, model.prepare(decoded.inputs[model.input_name])

        decoded, batch = decode() if len(body) <= INLINE_BYTES else await asyncio.to_thread(decode)
        rows = await server.run(name, batch)
        content, headers = encode_response(name, decoded, model.tensors(rows))
        return Response(content, headers=headers)

    @app.post("/v2/models/{name}/predict", summary="Typed predictions for a file", openapi_extra=_FILE_SCHEMA)
    async def predict(name: str, request: Request, filename: str = "upload", top_k: int | None = None) -> Response:
        """The file in the body (an image, a .npy array or CSV rows) -> one JSON line per sample, as
        ``trainfer predict --format jsonl`` writes them."""
        model = server.model(name)
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be >= 1; got {top_k}")
        body = await server.body(request)
        content_type = request.headers.get("content-type", "")

        def prepare() -> tuple[list[str], torch.Tensor]:
            items = read_upload(body, filename, content_type, model.predictor.preprocess_spec)
            return [i for i, _ in items], model.prepare([sample for _, sample in items])

        ids, batch = await asyncio.to_thread(prepare)
        results = model.results(await server.run(name, batch), top_k)
        lines = [
            json.dumps({"id": i, **r}, allow_nan=False) + "\n" for i, r in zip(ids, to_records(results), strict=True)
        ]
        return Response("".join(lines), media_type="application/jsonl")

    @app.post("/v2/models/{name}/explain", summary="Attribution heat map for a file", openapi_extra=_FILE_SCHEMA)
    async def explain(name: str, request: Request, filename: str = "upload") -> dict[str, Any]:
        """The first sample of the file in the body, explained by integrated gradients: the absolute
        attributions summed over channels, scaled to a maximum of 1 (``heatmap``, rows of numbers)."""
        model = server.model(name)
        body = await server.body(request)
        content_type = request.headers.get("content-type", "")
        items = await asyncio.to_thread(read_upload, body, filename, content_type, model.predictor.preprocess_spec)
        async with server.explaining:
            attributions = await asyncio.to_thread(model.predictor.explain, items[0][1])
        values = attributions.values[0].detach().double().abs()
        heat = values.sum(0) if values.dim() == 3 else values.reshape(1, -1)
        heat = heat / heat.max().clamp_min(1e-300)
        return {"id": items[0][0], "method": attributions.method, "heatmap": heat.tolist()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _versioned(name: str, version: str) -> str:
    if version != "1":
        raise HTTPError(404, f"model {name!r} has one version, 1; got {version!r}")
    return name


def _errors(app: FastAPI) -> None:
    """Every error as ``{"error": one line}``: no traceback ever reaches a client."""

    def answer(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers=headers)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, error: HTTPError) -> JSONResponse:
        return answer(error.status, str(error), error.headers)

    @app.exception_handler(MissingExtraError)
    async def missing_extra(request: Request, error: MissingExtraError) -> JSONResponse:
        return answer(501, one_line(error))

    @app.exception_handler(TrainferError)
    async def user_error(request: Request, error: TrainferError) -> JSONResponse:
        return answer(400, one_line(error))

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return answer(400, f"bad request parameters: {problems}")


class _Access:
    """ASGI middleware: the API key, one structured access-log line and the metrics of every request.

    An exception escaping the app (a bug) is logged with its traceback and answered 500 in one line.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], server: Server):
        self.app, self.server = app, server
        key = server.settings.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        path: str = scope["path"]
        try:
            if self.key is not None and path not in _OPEN_PATHS and not self._authorized(scope):
                await _send_json(sending, 401, {"error": f"missing or wrong API key (header {API_KEY_HEADER})"})
            else:
                await self.app(scope, receive, sending)
        except Exception:
            logger.exception("internal error answering %s %s", scope["method"], path[:200])
            if not started:
                await _send_json(sending, 500, {"error": "internal error in trainfer (a bug): logged on the server"})
        seconds = time.perf_counter() - start
        self.server.metrics.observe(_endpoint(path), status, seconds)
        client = scope.get("client") or ("", 0)
        access_logger.info(
            json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "client": client[0],
                    "method": scope["method"],
                    "path": path[:200],
                    "status": status,
                    "seconds": round(seconds, 6),
                }
            )
        )

    def _authorized(self, scope: dict[str, Any]) -> bool:
        assert self.key is not None
        given = next((value for name, value in scope["headers"] if name == API_KEY_HEADER.encode()), b"")
        return hmac.compare_digest(given, self.key)


async def _send_json(send: Any, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _endpoint(path: str) -> str:
    """A bounded label for the metrics: the route's kind, never the raw path."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v2", "models"] and len(parts) >= 3:
        last = parts[-1]
        return last if last in ("infer", "predict", "explain", "ready") else "metadata"
    if path in ("/", "/metrics", "/v2", "/v2/models", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"):
        return path
    return "other"


_INFER_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}
_FILE_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
}
