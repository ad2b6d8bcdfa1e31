"""``HEAD`` answered wherever ``GET`` is: the same status and headers, no body (RFC 9110, 9.3.2).

FastAPI's ``@app.get`` routes answer ``HEAD`` with 405, so an uptime monitor or a link checker
probing ``/``, ``/v2/health/ready`` or ``/metrics`` with ``HEAD`` saw a failure where ``GET``
succeeds. :class:`HeadAsGet` hands a ``HEAD`` request to the app as a ``GET`` and sends what the
app answers without its body: the headers, ``Content-Length`` and the security headers included,
are ``GET``'s. A route that takes no ``GET`` answers ``HEAD`` as it answers ``GET`` (405, with its
``Allow``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HeadAsGet"]


class HeadAsGet:
    """ASGI middleware: a ``HEAD`` request runs as ``GET`` in ``app``, its answer sent without a body."""

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
