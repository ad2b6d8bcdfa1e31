"""Bounds on a request's start line and headers -- their bytes and the time they take -- which
uvicorn's httptools protocol lacks.

Without them a client could send one header of any size: httptools gathers a header in memory until
its end (a 200 MB header grew the server by 306 MB), and ``--max-body-mb`` bounds bodies only; or it
could send its head a byte every few seconds (slowloris), each such connection held, with its memory
and file descriptor, for ever. :class:`BoundedHeadersProtocol` is uvicorn's ``HttpToolsProtocol``
(given as ``uvicorn.Config(http=partial(BoundedHeadersProtocol, header_timeout=...))``), counting a
request's head as it arrives; past :data:`MAX_HEADER_BYTES` or :data:`MAX_HEADER_LINES` it answers
``431 Request Header Fields Too Large``, past ``header_timeout`` seconds
(``ServerSettings.header_timeout``) ``408 Request Timeout``, each with the one-line ``{"error": ...}``
of every trainfer error and the headers of every answer (:mod:`trainfer.server.answer_headers`, as
uvicorn's own 400 of a malformed request and 503 past ``limit_concurrency`` have here), and closes the
connection (after a short linger that keeps the answer from being reset away:
:meth:`BoundedHeadersProtocol._linger`). So a connection holds at most the limit
plus one read (256 000 bytes with uvloop) of a request's head, for at most ``header_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, NoReturn

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from trainfer.server.answer_headers import with_safety_headers
from trainfer.server.error_answers import answer

__all__ = ["LINGER_SECONDS", "MAX_HEADER_BYTES", "MAX_HEADER_LINES", "BoundedHeadersProtocol", "HeadersTooLarge"]

logger = logging.getLogger("trainfer.server")

#: The most bytes of one request's start line and header lines (trailers of a chunked body included).
#: Real clients send well under 8 KiB; the limits of other servers: nginx 4 buffers of 8 KiB
#: (``large_client_header_buffers``, no line over 8 KiB), Node.js 16 KiB, Apache 8 KiB a line.
#: 64 KiB is twice nginx's total: a request that a proxy in front would pass is never refused here.
MAX_HEADER_BYTES = 64 * 1024
#: The most header lines of one request. Apache refuses more than 100 (``LimitRequestFields``); a
#: browser sends about 20. Each line costs about 100 bytes of Python objects once parsed, so 64 KiB of
#: ``a: b`` lines (10919 of them) would take 1.1 MB; 256 lines take at most 33 KB beyond their bytes.
MAX_HEADER_LINES = 256
#: Seconds a refused connection stays open, its answer sent and its sending side shut, reading and
#: dropping what the client still sends, so that closing it does not reset the answer away.
LINGER_SECONDS = 2.0
#: Bytes a header line adds to its name and value in its usual form (``Name: value\r\n``).
_HEADER_LINE = len(b": \r\n")
#: Bytes the request line adds to its method and target (two spaces, ``HTTP/1.1\r\n``), and the
#: blank line that ends the head.
_REQUEST_LINE = len(b"  HTTP/1.1\r\n\r\n")


class HeadersTooLarge(Exception):
    """Raised in a parser callback to stop httptools (any exception stops it) once the head is over a limit."""


class BoundedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with at most :data:`MAX_HEADER_BYTES` and :data:`MAX_HEADER_LINES`
    in a request's head, received within ``header_timeout`` seconds.

    A request's head is counted in its usual form: method and target plus 14 bytes, each header's
    name and value plus 4 (extra spaces around a value are not counted). The counts restart when a
    request's message is complete, so that the next request of a keep-alive or pipelined connection
    starts from zero:

    * ``_counted`` bytes and ``_lines``: what the parser has reported of this request's head (the
      target as it arrives, each header once it is complete, the method and request line's syntax
      when the head is complete), exact; checked at each report, so that the app never sees a head
      over the limits, and after every read;
    * ``_unreported``: bytes received since the parser last reported anything, an upper bound of
      the header httptools is gathering but has not reported yet (one that never ends); checked
      after every read. A read in which the parser reported something restarts it at zero (the
      part of that read after the last report is not known): the one read the bound allows.

    So a connection holds at most :data:`MAX_HEADER_BYTES` plus one read (256 000 bytes with
    uvloop) of a request's head, and the Python objects of at most :data:`MAX_HEADER_LINES` headers.

    The time is counted from ``_head_began``, the loop's time when the parser met the request's first
    byte (for the connection's first request: when the connection opened, so that a connection that
    never sends is closed too), None once its head is complete; the wait between the requests of a
    keep-alive connection is not counted (uvicorn's ``timeout_keep_alive`` bounds it). One timer a
    connection (``_head_timer``, :meth:`_check_head_time`) looks at it at least every
    ``header_timeout`` seconds, so that a request costs one clock read, not a timer of its own. While
    an earlier request of the connection is still being answered (pipelined: uvicorn may have stopped
    reading meanwhile), the client is not waited on: the head's time starts again at each look.

    Past a limit the answer is a 431 (:meth:`refuse`), unless an earlier request of the connection
    is still being answered (pipelined): an answer now would be read as the earlier one's, so the
    connection is closed without one. Past the time the answer is a 408. When a report goes past a
    limit, the parser is stopped by an exception, which uvicorn takes for a malformed request: it
    logs "Invalid HTTP request received." and calls :meth:`send_400_response`, which refuses with
    the 431 instead.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted = self._lines = self._unreported = 0  # see the class's description
        self._reported = False
        self._refusal: str | None = None
        self._header_timeout = header_timeout
        self._head_began: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None  # then, refused, the timer that ends the linger
        self._lingering = False  # refused: what arrives is read and dropped until the connection closes
        self._dropped = 0
        self._after_upgrade: int | None = None  # where a request asking to upgrade ended in the data parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        HttpToolsProtocol.connection_made(self, transport)
        self._head_began = self.loop.time()  # the first request's head: counted from the connection's opening
        self._head_timer = self.loop.call_later(self._header_timeout, self._check_head_time)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        HttpToolsProtocol.connection_lost(self, exc)

    # The callbacks run for every request and header: the base class's methods are called directly
    # (cheaper than super()) and each check is one comparison until a limit is passed.

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._drop(data)
            return
        self._reported = False
        self._parse(data)
        self._unreported = 0 if self._reported else self._unreported + len(data)
        if self._counted + self._unreported > MAX_HEADER_BYTES and not self._closing():
            self.refuse(431, _too_many_bytes())

    def _parse(self, data: bytes) -> None:
        """uvicorn's parsing of ``data``, and of what follows a request asking to upgrade in it.

        httptools stops at the end of such a request (``HttpParserUpgrade``); uvicorn, which switches
        no protocol here, answers it as plain HTTP but dropped the rest of ``data``: a request pipelined
        after it went unanswered until the connection timed out. Not switching, the connection stays
        HTTP/1.1 (RFC 9110, 7.8), so the rest is parsed as the next requests (httptools parses on)."""
        HttpToolsProtocol.data_received(self, data)
        while self._after_upgrade is not None and not self._closing():
            data, self._after_upgrade = data[self._after_upgrade :], None
            HttpToolsProtocol.data_received(self, data)

    def on_message_begin(self) -> None:
        if self._head_began is None:  # else the connection's first request, timed from its opening
            self._head_began = self.loop.time()
        HttpToolsProtocol.on_message_begin(self)

    def on_url(self, url: bytes) -> None:
        self._counted += len(url)
        self._reported = True
        if self._counted > MAX_HEADER_BYTES:
            self._stop(_too_many_bytes())
        HttpToolsProtocol.on_url(self, url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._counted += len(name) + len(value) + _HEADER_LINE
        self._lines += 1
        self._reported = True
        if self._counted > MAX_HEADER_BYTES:
            self._stop(_too_many_bytes())
        if self._lines > MAX_HEADER_LINES:
            self._stop(f"request has more header lines than the limit of {MAX_HEADER_LINES}")
        HttpToolsProtocol.on_header(self, name, value)

    def on_headers_complete(self) -> None:
        self._counted += _REQUEST_LINE + len(self.parser.get_method())
        self._reported = True
        if self._counted > MAX_HEADER_BYTES:
            self._stop(_too_many_bytes())
        self._head_began = None
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._reported = True
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._counted = self._lines = 0  # the next request of the connection starts from zero
        self._reported = True
        HttpToolsProtocol.on_message_complete(self)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser stopped on: the 431 when a limit stopped it, else
        uvicorn's 400 (its message, as ``{"error": msg}``) with the headers of every answer, then the
        connection closed, as uvicorn does."""
        if self._refusal is not None:
            self.refuse(431, self._refusal)
        else:
            self._write_answer(400, msg)
            self.transport.close()

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``{"error": message}`` (unless an earlier request of this connection
        is still being answered) and close the connection."""
        logger.warning("%s: %s (%d, connection closed)", _client(self.client), message, status)
        if not self._answering():
            self._write_answer(status, message)
        self._linger()

    def _write_answer(self, status: int, message: str) -> None:
        """Write the answer ``status`` ``{"error": message}`` to the connection itself (no app sees the
        request), with uvicorn's default headers, those of every answer
        (:func:`~trainfer.server.answer_headers.with_safety_headers`) and ``connection: close``."""
        response = answer(status, message)
        headers = with_safety_headers([*self.server_state.default_headers, *response.raw_headers])
        head = b"".join(b"%s: %s\r\n" % pair for pair in [*headers, (b"connection", b"close")])
        self.transport.write(STATUS_LINE[status] + head + b"\r\n" + bytes(response.body))

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's warning for an ``Upgrade`` request it does not switch, without its advice to install a
        WebSocket library: trainfer serves no WebSocket (``ws="none"``) and answers such a request as plain HTTP.

        uvicorn calls it handling httptools' ``HttpParserUpgrade``, whose argument is where the request
        ended in the data being parsed: kept for :meth:`_parse`, which parses on from there."""
        logger.warning("%s: unsupported upgrade request, answered as plain HTTP", _client(self.client))
        upgrade = sys.exc_info()[1]
        self._after_upgrade = upgrade.args[0] if isinstance(upgrade, httptools.HttpParserUpgrade) else None

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """uvicorn's start of a request's app, but its own 503 past ``limit_concurrency`` (an app of its
        own, written without trainfer's middleware) carries the headers of every answer too."""
        if app is service_unavailable:
            app = _with_safety_headers(app)
        HttpToolsProtocol._start_asgi_task(self, cycle, app)

    def _linger(self) -> None:
        """Close the connection without losing the answer just written (a lingering close).

        Closing a socket while the client's bytes are still arriving makes the kernel send a reset,
        which can destroy the answer before the client reads it (a client trickling its head met a
        ``ConnectionResetError`` instead of its 408). So the sending side is shut first (the client
        reads the answer, then the end of the stream), and what still arrives is read and dropped for
        at most :data:`LINGER_SECONDS` and :data:`MAX_HEADER_BYTES` before the connection closes."""
        self._lingering = True
        if self._head_timer is not None:
            self._head_timer.cancel()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._head_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _drop(self, data: bytes) -> None:
        """What a refused client still sends, dropped, until :data:`MAX_HEADER_BYTES` of it."""
        self._dropped += len(data)
        if self._dropped > MAX_HEADER_BYTES:
            self.transport.close()

    def _closing(self) -> bool:
        return self._lingering or self.transport.is_closing()

    def _answering(self) -> bool:
        """Whether an earlier request of this connection is still being answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def _check_head_time(self) -> None:
        """The connection's timer: 408 once the head being received has taken ``header_timeout``
        seconds (unless an earlier request is still being answered: its time then starts again),
        else a look again when it would have (or ``header_timeout`` from now, between heads)."""
        if self._closing():
            return
        now = self.loop.time()
        if self._head_began is not None and self._answering():
            self._head_began = now
        elif self._head_began is not None and now - self._head_began >= self._header_timeout:
            self.refuse(408, f"request line and headers not received within {self._header_timeout:g} s")
            return
        began = now if self._head_began is None else self._head_began
        self._head_timer = self.loop.call_at(began + self._header_timeout, self._check_head_time)

    def _stop(self, refusal: str) -> NoReturn:
        """Stop the parser (in a callback) for ``refusal``: uvicorn then calls :meth:`send_400_response`."""
        self._refusal = refusal
        raise HeadersTooLarge(refusal)


def _with_safety_headers(app: Any) -> Any:
    """The ASGI ``app`` whose answers carry :data:`~trainfer.server.answer_headers.SAFETY_HEADERS` too."""

    async def safe(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_safety_headers(message.get("headers", ()))}
            await send(message)

        await app(scope, receive, sending)

    return safe


def _too_many_bytes() -> str:
    return f"request line and headers exceed the limit of {MAX_HEADER_BYTES} bytes"


def _client(address: tuple[str, int] | None) -> str:
    return f"{address[0]}:{address[1]}" if address else "a client"
