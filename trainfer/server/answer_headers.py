"""The headers every answer of the server carries, whichever layer writes it.

Two layers write answers: the app (every answer passes :class:`~trainfer.server.access.AccessMiddleware`),
and the HTTP protocol itself before or without the app (:class:`~trainfer.server.header_limit.BoundedHeadersProtocol`:
the 431 of a head over its limits, the 408 of one too slow, the 400 of a malformed request, uvicorn's 503
past ``limit_concurrency``). Both add :data:`SAFETY_HEADERS` through :func:`with_safety_headers`, so that
a header added here reaches every answer.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SAFETY_HEADERS", "with_safety_headers"]

#: Sent with every answer: a browser never guesses another type than the one declared (a JSON line
#: echoing an uploaded file's name is never run as HTML).
SAFETY_HEADERS = ((b"x-content-type-options", b"nosniff"),)


def with_safety_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An answer's ``headers`` (name and value as bytes, as ASGI and the raw protocol write them)
    followed by :data:`SAFETY_HEADERS`."""
    return [*headers, *SAFETY_HEADERS]
