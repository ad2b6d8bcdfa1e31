"""The bounds on a request's start line and headers (``trainfer.server.header_limit``): uvicorn's httptools
protocol has none, so a 200 MB header once took 306 MB of the server's memory, and a client sending its
head a byte at a time held a connection for ever.

The first tests drive the protocol class in this process through uvicorn's own entry points (they fail
at once if a uvicorn upgrade renames or stops calling a hook); the others speak raw HTTP to a real
server, one process and ``--workers 2``.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from server_process import running_server
from serving_models import save_bundle

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

from trainfer.server import header_limit  # noqa: E402
from trainfer.server.app import ServerSettings  # noqa: E402
from trainfer.server.header_limit import (  # noqa: E402
    MAX_HEADER_BYTES,
    MAX_HEADER_LINES,
    BoundedHeadersProtocol,
)

TOO_LARGE = f"request line and headers exceed the limit of {MAX_HEADER_BYTES} bytes"
#: The header timeout of the protocols and the server these tests time out (seconds).
SHORT = 0.05
TOO_SLOW = f"request line and headers not received within {SHORT:g} s"


def head(size: int, path: str = "/v2/health/live") -> bytes:
    """A GET request whose head (request line, headers, blank line) is exactly ``size`` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".encode()
    return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"


# -- the protocol class in this process ------------------------------------------------------------


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = b"", False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False  # a refusal then closes at once: see HalfClosingTransport for the linger


class HalfClosingTransport(Transport):
    """A transport that can shut its sending side (a TCP socket's ``write_eof``), as uvloop's can."""

    def __init__(self) -> None:
        super().__init__()
        self.eof_written = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


async def app(scope, receive, send):
    """Answers ``ok``, after ``?wait`` seconds when the query string is ``wait``."""
    if scope["query_string"] == b"wait":
        await asyncio.sleep(4 * SHORT)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def open_connection(header_timeout: float = ServerSettings.header_timeout, transport: Transport | None = None):
    """``(protocol, transport, loop)``: a :class:`BoundedHeadersProtocol` on a fake transport (by default a
    :class:`Transport`), as uvicorn builds one per connection; close it with :func:`close_connection`."""
    loop = asyncio.new_event_loop()
    config = uvicorn.Config(app, http=BoundedHeadersProtocol, log_level="critical")
    protocol = BoundedHeadersProtocol(
        config, uvicorn.server.ServerState(), {}, _loop=loop, header_timeout=header_timeout
    )
    transport = transport or Transport()
    protocol.connection_made(transport)
    return protocol, transport, loop


def close_connection(protocol: BoundedHeadersProtocol, loop: asyncio.AbstractEventLoop) -> None:
    protocol.connection_lost(None)
    loop.close()


@pytest.fixture
def connection():
    """A connection with the default header timeout."""
    protocol, transport, loop = open_connection()
    yield protocol, transport, loop
    close_connection(protocol, loop)


@pytest.fixture
def hasty_connection():
    """A connection whose header timeout is :data:`SHORT`."""
    protocol, transport, loop = open_connection(SHORT)
    yield protocol, transport, loop
    close_connection(protocol, loop)


def test_the_hooks_it_overrides_are_uvicorn_httptools_methods():
    overridden = {name for name in vars(BoundedHeadersProtocol) if not name.startswith("__")}
    own = {
        "refuse",
        "_write_answer",
        "_stop",
        "_answering",
        "_check_head_time",
        "_linger",
        "_drop",
        "_closing",
        "_parse",
    }
    hooks = overridden - own
    assert hooks == {
        "connection_made",
        "connection_lost",
        "on_message_begin",
        "data_received",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "send_400_response",
        "_unsupported_upgrade_warning",
        "_start_asgi_task",
    }
    missing = [name for name in hooks if not callable(getattr(HttpToolsProtocol, name, None))]
    assert not missing, f"uvicorn's HttpToolsProtocol no longer has {missing}: the header bound does not apply"


def answered(transport: Transport) -> tuple[int, dict]:
    status_line, _, rest = transport.written.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_head_at_the_limit_reaches_the_app_one_byte_more_is_431(connection):
    protocol, transport, loop = connection
    protocol.data_received(head(MAX_HEADER_BYTES))
    loop.run_until_complete(asyncio.gather(*protocol.tasks))
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed
    protocol.data_received(head(MAX_HEADER_BYTES + 1))  # the next request of the connection starts from zero
    assert not protocol.tasks, "an oversized head reached the app"
    assert transport.written.count(b"HTTP/1.1 431 ") == 1 and transport.closed
    transport.written = transport.written.partition(b"ok")[2]
    assert answered(transport) == (431, {"error": TOO_LARGE})


def test_header_lines_past_the_limit_are_431(connection):
    protocol, transport, loop = connection
    protocol.data_received(b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * MAX_HEADER_LINES + b"\r\n")
    loop.run_until_complete(asyncio.gather(*protocol.tasks))
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed
    transport.written = b""
    protocol.data_received(b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n")
    assert not protocol.tasks and transport.closed
    assert answered(transport) == (
        431,
        {"error": f"request has more header lines than the limit of {MAX_HEADER_LINES}"},
    )


def test_a_head_that_never_ends_is_refused_after_the_limit_and_one_read(connection):
    protocol, transport, _ = connection
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: ")
    piece = b"a" * 4096
    sent = 0
    while not transport.closed:
        assert sent <= MAX_HEADER_BYTES + len(piece), "still reading past the limit"
        protocol.data_received(piece)
        sent += len(piece)
    assert answered(transport) == (431, {"error": TOO_LARGE})
    assert not protocol.tasks


def wait(loop: asyncio.AbstractEventLoop, timeouts: float) -> None:
    """Run ``loop`` for ``timeouts`` header timeouts (:data:`SHORT`)."""
    loop.run_until_complete(asyncio.sleep(timeouts * SHORT))


def test_a_head_not_complete_in_time_is_408_and_the_connection_closed(hasty_connection):
    protocol, transport, loop = hasty_connection
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    wait(loop, 3)
    assert answered(transport) == (408, {"error": TOO_SLOW}) and transport.closed
    assert not protocol.tasks, "a late head reached the app"


def test_a_refused_connection_lingers_dropping_what_arrives_then_closes(monkeypatch):
    """Closing a socket while the client still sends resets it, which can destroy the answer unread (a
    client trickling its head met ConnectionResetError instead of its 408): the sending side is shut
    after the answer, what arrives is dropped (never parsed), and the connection closes after
    LINGER_SECONDS, or at once past MAX_HEADER_BYTES dropped."""
    monkeypatch.setattr(header_limit, "LINGER_SECONDS", 2 * SHORT)
    protocol, transport, loop = open_connection(SHORT, HalfClosingTransport())
    try:
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Slow: a")
        wait(loop, 1.5)  # past the header timeout, within the linger
        assert answered(transport) == (408, {"error": TOO_SLOW}) and transport.eof_written and not transport.closed
        protocol.data_received(b"a" * 1000)  # still trickling: dropped, not parsed, no second answer
        assert transport.written.count(b"HTTP/1.1") == 1 and not transport.closed
        wait(loop, 3)
        assert transport.closed
    finally:
        close_connection(protocol, loop)
    protocol, transport, loop = open_connection(SHORT, HalfClosingTransport())
    try:
        wait(loop, 1.5)
        protocol.data_received(b"a" * (MAX_HEADER_BYTES + 1))
        assert transport.eof_written and transport.closed  # a client flooding the linger is cut off
    finally:
        close_connection(protocol, loop)


def test_a_connection_that_sends_nothing_is_408_and_closed(hasty_connection):
    _, transport, loop = hasty_connection
    wait(loop, 3)
    assert answered(transport) == (408, {"error": TOO_SLOW}) and transport.closed


def test_the_wait_between_keep_alive_requests_is_not_counted(hasty_connection):
    protocol, transport, loop = hasty_connection
    for _ in range(2):  # uvicorn's keep-alive timeout (5 s) bounds the wait, not the header timeout
        protocol.data_received(head(100))
        wait(loop, 3)
    assert transport.written.count(b"HTTP/1.1 200 ") == 2 and b" 408 " not in transport.written
    assert not transport.closed


def test_a_later_requests_head_is_timed_too(hasty_connection):
    protocol, transport, loop = hasty_connection
    protocol.data_received(head(100))
    wait(loop, 3)  # idle between requests: not counted
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed
    transport.written = b""
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    wait(loop, 3)
    assert answered(transport) == (408, {"error": TOO_SLOW}) and transport.closed


def test_a_pipelined_head_is_not_timed_while_an_earlier_request_is_answered(hasty_connection):
    protocol, transport, loop = hasty_connection
    first, second = head(100, "/?wait"), head(100)
    protocol.data_received(first + second[:20])  # the app answers the first after 4 timeouts
    wait(loop, 3)  # the second head's timer ran out 3 times meanwhile
    assert transport.written == b"" and not transport.closed
    protocol.data_received(second[20:])
    loop.run_until_complete(asyncio.gather(*protocol.tasks))
    assert transport.written.count(b"HTTP/1.1 200 ") == 2 and b" 408 " not in transport.written


def test_a_malformed_request_keeps_uvicorns_400_with_the_headers_of_every_answer(connection):
    protocol, transport, _ = connection
    protocol.data_received(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert answered(transport) == (400, {"error": "Invalid HTTP request received."}) and transport.closed
    assert b"\r\nx-content-type-options: nosniff\r\n" in transport.written


# -- a real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return save_bundle(tmp_path_factory.mktemp("headers") / "tiny", seed=0)


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(str(bundle)) as running:
        yield running


def read_response(stream) -> tuple[int, bytes]:
    """``(status, body)`` of the next response on ``stream`` (the socket's file), which has a Content-Length."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, stream.read(length)


def exchange(server, data: bytes, answers: int = 1) -> tuple[list[tuple[int, bytes]], bytes]:
    """Send ``data`` on a fresh connection; the ``answers`` responses read, and what followed them
    within 10 s (``b""``: the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(data)
        stream = client.makefile("rb")
        responses = [read_response(stream) for _ in range(answers)]
        client.settimeout(10)
        try:
            after = stream.read1(1)
        except TimeoutError:
            after = b"(still open)"
        return responses, after


def test_server_serves_a_head_at_the_limit_and_refuses_one_byte_more(server):
    [(status, _)], after = exchange(server, head(MAX_HEADER_BYTES) + head(100))
    assert status == 200 and after == b"H"  # the next response follows: the connection lives on
    [(status, body)], after = exchange(server, head(MAX_HEADER_BYTES + 1))
    assert (status, json.loads(body)) == (431, {"error": TOO_LARGE})
    assert after == b"", "the connection stayed open after the 431"
    assert TOO_LARGE in server.logs()


def test_keep_alive_and_pipelined_requests_are_served(server):
    requests = head(200) + head(300, "/v2/health/ready") + head(MAX_HEADER_BYTES - 10, "/v2/models")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        stream = client.makefile("rb")
        for _ in range(3):  # keep-alive: one request at a time on one connection
            client.sendall(head(1000))
            assert read_response(stream)[0] == 200
        client.sendall(requests * 20)  # pipelined: 60 requests in one send, some near the limit
        statuses = [read_response(stream)[0] for _ in range(60)]
    assert statuses == [200] * 60


#: The headers of a request asking to upgrade to a WebSocket, and to HTTP/2 (h2c): no protocol is switched.
UPGRADES = [
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
]


@pytest.mark.parametrize("upgrade", UPGRADES)
def test_requests_pipelined_after_one_asking_to_upgrade_are_answered(server, upgrade):
    """Attacker round 9: the request asking to upgrade was answered as plain HTTP, and those pipelined after it
    in the same read were dropped, unanswered until the connection timed out (5 s here, the socket's 30 s)."""
    asking = head(100).removesuffix(b"\r\n") + upgrade + b"\r\n"
    last = head(100, "/v2/models").removesuffix(b"\r\n\r\n") + b"\r\nConnection: close\r\n\r\n"
    responses, after = exchange(server, asking + head(100, "/v2/health/ready") + asking + last, answers=4)
    assert [status for status, _ in responses] == [200] * 4 and after == b""
    assert b"models" in responses[3][1]


def resident_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_200_mb_header_is_cut_off_without_growing_the_server(server):
    exchange(server, head(MAX_HEADER_BYTES + 1))  # the refusal's code paths run once before measuring
    before = resident_mb(server.process.pid)
    piece, sent = b"a" * 2**20, 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nX-Big: ")
        with pytest.raises(OSError):  # the server closes the connection: the send fails
            while sent < 200 * 2**20:
                client.sendall(piece)
                sent += len(piece)
    grown = resident_mb(server.process.pid) - before
    assert sent < 32 * 2**20, f"the server read {sent} bytes of one header before closing the connection"
    assert grown < 8, f"the server grew by {grown:.1f} MB"


# -- a slow head, on a real server ------------------------------------------------------------------

#: The header timeout of the servers below (seconds).
SERVER_TIMEOUT = 1
LATE = f"request line and headers not received within {SERVER_TIMEOUT} s"


@pytest.fixture(scope="module")
def hasty_server(bundle):
    with running_server(str(bundle), "--header-timeout", str(SERVER_TIMEOUT)) as running:
        yield running


def refused_late(client: socket.socket) -> bool:
    """Whether the server answered 408 on ``client`` (a connection waiting for its head), then closed it."""
    client.settimeout(30)
    stream = client.makefile("rb")
    status, body = read_response(stream)
    return (status, json.loads(body), stream.read()) == (408, {"error": LATE}, b"")


def test_a_head_trickled_a_byte_at_a_time_is_408_and_closed(hasty_server):
    """Slowloris: each byte arrives well within any read timeout, the head never within the header's."""
    with socket.create_connection(("127.0.0.1", hasty_server.port)) as client:
        client.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: ")
        for _ in range(100):  # a byte every 0.2 s, 20 s at most: the server's time runs out after 1 s
            client.sendall(b"a")
            if select.select([client], [], [], 0.2)[0]:  # the server answered
                break
        assert refused_late(client)
    assert LATE in hasty_server.logs()


def test_many_slow_or_silent_connections_are_all_closed_and_the_server_serves_on(hasty_server):
    clients = [socket.create_connection(("127.0.0.1", hasty_server.port)) for _ in range(20)]
    try:
        for client in clients[::2]:  # half send part of a head, half nothing at all
            client.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")
        assert all(refused_late(client) for client in clients)
    finally:
        for client in clients:
            client.close()
    assert exchange(hasty_server, head(100))[0][0][0] == 200


def test_a_keep_alive_connection_may_wait_longer_than_the_header_timeout_between_requests(hasty_server):
    with socket.create_connection(("127.0.0.1", hasty_server.port), timeout=30) as client:
        stream = client.makefile("rb")
        for _ in range(2):  # uvicorn's keep-alive timeout (5 s) bounds the wait between them, not ours
            client.sendall(head(100))
            assert read_response(stream)[0] == 200
            time.sleep(2 * SERVER_TIMEOUT)


def answer_head(data: bytes | None, port: int) -> tuple[int, dict[bytes, list[bytes]]]:
    """The status and headers (lower-case names, each with its values) of the answer to ``data`` sent on a
    fresh connection to ``port`` (None: nothing sent, the answer awaited)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        if data is not None:
            client.sendall(data)
        stream = client.makefile("rb")
        status = int(stream.readline().split()[1])
        headers: dict[bytes, list[bytes]] = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        return status, headers


def test_every_answer_the_protocol_writes_itself_carries_nosniff_once(bundle):
    """Attacker round 8: the 431 and the header timeout's 408 lacked ``X-Content-Type-Options: nosniff``, which
    every answer carries (serving.md). Each answer written without the app, on a real socket: a head over
    the byte and the line limits (431), one too slow (408), a malformed request (uvicorn's 400), a WebSocket
    upgrade (no WebSocket protocol: answered by the app as plain HTTP, not by the library's bare 403), and
    uvicorn's 503 past ``limit_concurrency`` (2 x ``--max-connections``: two idle connections fill it)."""
    requests = {
        431: head(MAX_HEADER_BYTES + 1),
        400: b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        200: b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        408: None,
    }
    lines = b"GET /v2/health/live HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n"
    options = ("--header-timeout", str(SERVER_TIMEOUT), "--max-connections", "1")
    with running_server(str(bundle), *options) as server:
        answers = [(status, answer_head(data, server.port)) for status, data in [*requests.items(), (431, lines)]]
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            answers.append((503, answer_head(head(100), server.port)))
        finally:
            for client in idle:
                client.close()
    for expected, (status, headers) in answers:
        assert (status, headers.get(b"x-content-type-options")) == (expected, [b"nosniff"]), (expected, headers)


def test_workers_bound_headers_too(bundle):
    with running_server(str(bundle), "--workers", "2", "--header-timeout", str(SERVER_TIMEOUT)) as server:
        [(status, body)], after = exchange(server, head(MAX_HEADER_BYTES + 1))
        assert (status, json.loads(body), after) == (431, {"error": TOO_LARGE}, b"")
        assert exchange(server, head(MAX_HEADER_BYTES))[0][0][0] == 200
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
            assert refused_late(client)
