"""Every request's gate and record: the ``Host`` it names (:mod:`trainfer.server.hosts`), the number
of requests with a body handled at once (a 503 with ``Retry-After`` past ``max_requests``), the API
key, one structured access-log line (the logger ``trainfer.server.access``), the metrics, a
``nosniff`` header on every answer (:mod:`trainfer.server.answer_headers`), and a one-line 500 for an
exception escaping the app."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from trainfer.server.answer_headers import with_safety_headers
from trainfer.server.error_answers import CLIENT_GONE, INTERNAL_ERROR
from trainfer.server.hosts import HostCheck
from trainfer.server.state import Server

logger = logging.getLogger("trainfer.server")
access_logger = logging.getLogger("trainfer.server.access")

API_KEY_HEADER = "x-api-key"
_API_KEY_NAME = API_KEY_HEADER.encode()
_OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"})
#: Methods whose requests hold no body: never counted against max_requests (probes, metadata and
#: /metrics answer under any load).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


class AccessMiddleware:
    """ASGI middleware: the API key, one structured access-log line and the metrics of every request.

    An exception escaping the app (a bug) is logged with its traceback and answered 500 in one line.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], server: Server):
        self.app, self.server = app, server
        key = server.settings.api_key
        self.key = key.encode() if key else None
        self.hosts = HostCheck(server.settings.host, server.settings.allowed_hosts)
        self.in_flight = 0  # requests with a body being handled: at most settings.max_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        started = gone = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, started, gone
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": with_safety_headers(message.get("headers", ()))}
            if gone:
                return
            try:
                await send(message)
            except (RuntimeError, OSError):  # the connection is closed: its client left (pipelined requests unread)
                gone = True

        path: str = scope["path"]
        counted = scope["method"] not in _BODILESS  # only a request that may carry a body holds one
        self.in_flight += counted
        try:
            refusal = self._refusal(scope, counted)
            if refusal is not None:
                await _send_json(sending, *refusal)
            else:
                await self.app(scope, receive, sending)
        except Exception:
            logger.exception("internal error answering %s %s", scope["method"], path[:200])
            if not started:
                await _send_json(sending, 500, {"error": INTERNAL_ERROR})
        finally:
            self.in_flight -= counted
        self._record(scope, CLIENT_GONE if gone else status, time.perf_counter() - start)

    def _refusal(self, scope: Scope, counted: bool) -> tuple[int, dict[str, str], dict[str, str]] | None:
        """(status, document, headers) of a request refused before the app sees it: naming a host
        this server is not (400, :mod:`trainfer.server.hosts`), over ``max_requests`` (503), or
        without the API key (401); None to let it through."""
        settings = self.server.settings
        foreign = self.hosts.refusal(scope["headers"])
        if foreign is not None:
            return 400, {"error": foreign}, {}
        if counted and self.in_flight > settings.max_requests:
            message = f"overloaded: {settings.max_requests} requests are being handled; retry later"
            return 503, {"error": message}, {"retry-after": str(settings.retry_after)}
        if self.key is not None and scope["path"] not in _OPEN_PATHS:
            problem = self._key_problem(scope)
            if problem is not None:
                return 401, {"error": problem}, {}
        return None

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        """The request in the metrics and, when that logger is on, one JSON line of the access log."""
        path: str = scope["path"]
        self.server.metrics.observe(endpoint_label(path), status, seconds)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client") or ("", 0)
        access_logger.info(
            _json_line(
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

    def _key_problem(self, scope: Scope) -> str | None:
        """Why the request's API key is refused, or None when it sends the key once: a header given
        twice is refused whatever its values (a proxy and a client may each read a different one)."""
        assert self.key is not None
        given = [value for name, value in scope["headers"] if name == _API_KEY_NAME]
        if len(given) > 1:
            return f"header {API_KEY_HEADER} given {len(given)} times: send the API key once"
        if not given or not hmac.compare_digest(given[0], self.key):
            return f"missing or wrong API key (header {API_KEY_HEADER})"
        return None


def _json_line(document: dict[str, Any]) -> str:
    """``document`` as one line of JSON: orjson's (a third of the standard library's cost per access
    line), or the standard library's for text orjson refuses (a lone surrogate, escaped as ``\\udXXX``)."""
    try:
        return orjson.dumps(document).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(document)


async def _send_json(send: Any, status: int, document: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def endpoint_label(path: str) -> str:
    """A bounded label for the metrics: the route's kind, never the raw path."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v2", "models"] and len(parts) >= 3:
        last = parts[-1]
        return last if last in ("infer", "predict", "explain", "ready") else "metadata"
    if path in ("/", "/metrics", "/v2", "/v2/models", "/v2/health/live", "/v2/health/ready", "/docs", "/openapi.json"):
        return path
    return "other"
