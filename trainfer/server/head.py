"""``HEAD`` answered wherever ``GET`` is: the same status and headers, no body (RFC 9110, 9.3.2).

FastAPI's ``@app.get`` routes answer ``HEAD`` with 405, so an uptime monitor or a link checker
probing ``/``, ``/v2/health/ready`` or ``/metrics`` with ``HEAD`` saw a failure where ``GET``
succeeds. :class:`HeadAsGet` hands a ``HEAD`` request to the app as a ``GET`` and sends what the
app answers without its body: the headers, ``Content-Length`` and the security headers included,
are ``GET``'s. A route that takes no ``GET`` answers ``HEAD`` as it answers ``GET`` (405, with its
``Allow``), and :class:`AllowHead` makes a 405 of a route that takes ``GET`` list ``HEAD`` in its
``Allow``.

The two are apart because only FastAPI's routes take ``GET``: :class:`AllowHead` wraps FastAPI
alone, inside :class:`~trainfer.server.infer_route.InferRoute`, so an inference request (whose 405
allows ``POST`` only) never pays for a wrapped ``send`` (0.49 us of CPU a call in a loop,
``benchmarks/bench_head_wrapper.py``; below the noise of a whole request, docs/serving.md).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["AllowHead", "HeadAsGet"]


class HeadAsGet:
    """ASGI middleware: a ``HEAD`` request runs as ``GET`` in ``app``, its answer sent without a body;
    any other request goes to ``app`` as it came."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class AllowHead:
    """ASGI middleware around the routes that take ``GET``: a 405's ``Allow`` that names ``GET`` names
    ``HEAD`` too (RFC 9110, 10.2.1: every method the route takes, and :class:`HeadAsGet` takes ``HEAD``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, _allowing_head(send) if scope["type"] == "http" else send)


def _allowing_head(send: Send) -> Send:
    """``send``, with ``HEAD`` added to a 405's ``Allow`` header wherever it lists ``GET``."""

    async def with_head(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 405:
            message = {**message, "headers": [_with_head(name, value) for name, value in message.get("headers", [])]}
        await send(message)

    return with_head


def _with_head(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """An ``Allow`` header listing ``GET`` and not ``HEAD`` with ``HEAD`` added; any other header as it is."""
    methods = [method.strip() for method in value.split(b",")]
    if name.lower() == b"allow" and b"GET" in methods and b"HEAD" not in methods:
        return name, b", ".join([*methods, b"HEAD"])
    return name, value
