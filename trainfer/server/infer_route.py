"""The Open Inference Protocol's inference endpoint, answered ahead of FastAPI: the server's hot path.

``POST /v2/models/{name}/infer`` (and ``/v2/models/{name}/versions/{version}/infer``) is every
request of a loaded server, and on a small model FastAPI's layers -- its exception and body-limit
middleware, routing, parameter solving -- cost more than the protocol's own work. :class:`InferRoute`
is an ASGI middleware that answers those paths itself and hands every other request to the app it
wraps; it sits inside :class:`~trainfer.server.access.AccessMiddleware`, so the API key, the
access log and the metrics apply to it as to every route.

A request's path through it: its body (bounded, :meth:`~trainfer.server.state.Server.body`), decoded
(:func:`~trainfer.server.protocol.decode_request`) and checked (:meth:`ServedModel.prepare`), its
samples through the model's dynamic batcher (:meth:`~trainfer.server.state.Server.run`), its rows
encoded (:func:`~trainfer.server.protocol.encode_response`): all but the body's read within the
request timeout (:meth:`~trainfer.server.state.Server.bounded`). Errors are answered as every route
answers them (:func:`~trainfer.server.error_answers.error_answer`); any other exception is a bug and
propagates to the access middleware (logged with its traceback, answered 500 in one line).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from trainfer.errors import InputError
from trainfer.server.error_answers import error_answer
from trainfer.server.protocol import HEADER_LENGTH, decode_request, encode_response
from trainfer.server.state import HTTPError, Server

__all__ = ["INLINE_BYTES", "InferRoute", "versioned"]

#: Request bodies up to this size are decoded on the event loop (a thread hop would cost more than
#: the decoding); larger ones in a worker thread, so that the loop keeps answering meanwhile.
INLINE_BYTES = 64 * 1024
_HEADER_LENGTH = HEADER_LENGTH.encode("latin-1")
_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


class InferRoute:
    """ASGI middleware: inference requests answered here, every other request by ``app``."""

    def __init__(self, app: ASGIApp, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(_route_path(scope)) if scope["type"] == "http" else None
        if match is None:
            return await self.app(scope, receive, send)
        try:
            if scope["method"] != "POST":
                raise HTTPError(405, "Method Not Allowed", {"Allow": "POST"})
            content, headers = await self.infer(scope, receive, match["name"], match["version"] or "1")
        except Exception as error:
            answer = error_answer(error)
            if answer is None:
                raise
            return await answer(scope, receive, send)
        fields = [(b"content-length", str(len(content)).encode())]
        fields += [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": fields})
        await send({"type": "http.response.body", "body": content})

    async def infer(self, scope: Scope, receive: Receive, name: str, version: str) -> tuple[bytes, dict[str, str]]:
        """The protocol's answer to one inference request for model ``name``: its body and headers."""
        server = self.server
        model = server.model(versioned(name, version))
        headers = _headers(scope, (b"content-length", _HEADER_LENGTH))
        body = await server.body(receive, headers[0])

        def decode() -> tuple[Any, Any]:
            decoded = decode_request(body, headers[1])
            if set(decoded.inputs) != {model.input_name}:
                raise InputError(
                    f"model {name!r} takes one input named {model.input_name!r}; got {list(decoded.inputs)}"
                )
            return decoded, model.prepare(decoded.inputs[model.input_name])

        async def answer() -> tuple[bytes, dict[str, str]]:
            decoded, batch = decode() if len(body) <= INLINE_BYTES else await server.decode(decode)
            rows = await server.run(name, batch)

            def encoded() -> tuple[bytes, dict[str, str]]:
                return encode_response(name, decoded, model.tensors(rows))

            return await server.decode(encoded) if model.decodes_answers else encoded()  # decoding: a turn per core

        return await server.bounded(answer())


def _headers(scope: Scope, names: tuple[bytes, ...]) -> list[str | None]:
    """The values of the request headers ``names`` (lower case; None when absent), read from the ASGI scope
    without building Starlette's header mapping. A header repeated with another value is an :class:`InputError`
    (which one the client meant, or a proxy before this server read, is a guess)."""
    found: list[str | None] = [None] * len(names)
    for key, value in scope["headers"]:
        if key in names:
            where, text = names.index(key), value.decode("latin-1")
            earlier = found[where]
            if earlier is not None and earlier != text:
                raise InputError(
                    f"header {key.decode()} given twice with different values, {ascii(earlier[:40])} and "
                    f"{ascii(text[:40])}: send it once"
                )
            found[where] = text
    return found


def _route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (``root_path``, e.g. a Ray Serve route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def versioned(name: str, version: str) -> str:
    """``name``, when ``version`` is the one version a served model has ("1"); else a 404."""
    if version != "1":
        raise HTTPError(404, f"model {name!r} has one version, 1; got {version!r}")
    return name
