"""What one app of ``trainfer serve`` holds: its settings, the served models with their dynamic
batchers and metrics, and the HTTP answers (:class:`HTTPError`) their limits give."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from trainfer.errors import InputError, NonFiniteError
from trainfer.server.batching import COMPUTE_BOUND, DynamicBatcher, Overloaded, default_workers, usable_cores
from trainfer.server.ensemble_model import load_ensemble
from trainfer.server.hosts import check_allowed_hosts
from trainfer.server.metrics import Metrics
from trainfer.server.model import ServedModel, load_model

logger = logging.getLogger("trainfer.server")
T = TypeVar("T")

#: Bounds of :class:`ServerSettings`' numbers (and ``trainfer serve``'s options): field -> (least, most).
LIMITS: dict[str, tuple[float, float]] = {
    "max_batch": (1, 65536),
    "max_delay_ms": (0, 60_000),
    "max_queue": (1, 2**20),
    "max_body": (1, 2**31),
    "timeout": (0.001, 86_400),
    "header_timeout": (0.001, 86_400),
    "retry_after": (0, 3600),
    "batch_workers": (1, 1024),
    "max_requests": (1, 10**6),
}

#: The fields of :data:`LIMITS` that are not whole numbers.
_FRACTIONAL = ("max_delay_ms", "timeout", "header_timeout")


@dataclass(frozen=True)
class ServerSettings:
    """What ``trainfer serve`` was asked to serve, and its limits.

    ``bundles`` maps model names to bundle paths; ``max_queue`` bounds the samples waiting per
    model; ``max_body`` the bytes of one request; ``timeout`` the seconds one request may wait
    for its answer; ``api_key`` (when set) must be sent in the ``X-API-Key`` header;
    ``batch_workers`` the batches of one model that may run at once (None: one per core over
    torch's threads per forward, or 1 for a model whose one-sample forward takes under 1 ms,
    :func:`~trainfer.server.batching.default_workers`); ``max_requests`` the requests with a body
    (POST) handled at once (``--max-connections``): the next is answered 503 with ``Retry-After``
    before its body is read; bodiless requests (probes, metadata, metrics) are never refused so.
    ``header_timeout``: the seconds a request's start line and headers may take to arrive (408 past
    them, :mod:`trainfer.server.header_limit`): from the request's first byte, or for a connection's
    first request from the connection's opening. Apache's ``mod_reqtimeout`` allows 20 s, nginx 60 s
    (``client_header_timeout``); a real client sends its head at once, in well under a second.

    ``compile`` maps model names to the keyword arguments of :func:`trainfer.serve.gated.compile`
    (``gate``, ``gate_data``, ``calibration``, ``candidates``, ``rounds``, ...; ``runtime="auto"``
    implied): that model is searched at start-up, before it is ready, and serves what the search
    chose. ``write_runtime``: also record the choice in its bundle, as ``trainfer compile`` does.

    ``ensembles`` maps more model names to lists of bundle paths: each is served as one model, the
    ensemble :meth:`trainfer.Predictor.ensemble` makes of those bundles with its ``weights`` (by name;
    absent: equal weights), every batch running every member (:mod:`trainfer.server.ensemble_model`).

    ``host``: the address the server listens on (:func:`trainfer.server.run.serve` sets it; Ray
    Serve's proxy's for a deployment), and ``allowed_hosts`` more names (``"*"``: any): together the
    ``Host`` headers a request may send (:class:`~trainfer.server.hosts.HostCheck`; others are a 400:
    a page rebinding its domain to this machine is refused).
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
    batch_workers: int | None = None
    max_requests: int = 512
    header_timeout: float = 20.0
    compile: dict[str, dict[str, Any]] | None = None
    write_runtime: bool = False
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    ensembles: dict[str, list[str]] = field(default_factory=dict)
    weights: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every number finite and within :data:`LIMITS` (an infinite delay or timeout would hold
        requests); an API key one that clients can send (:func:`check_api_key`)."""
        for name, (least, most) in LIMITS.items():
            check_number(name, getattr(self, name), least, most, integer=name not in _FRACTIONAL)
        check_api_key(self.api_key, "api_key")
        for name in self.names:
            check_model_name(name)
        both = sorted(set(self.bundles) & set(self.ensembles))
        if both:
            raise InputError(f"model names {both} name both a bundle and an ensemble: expected each name once")
        stray = sorted(set(self.weights) - set(self.ensembles))
        if stray:
            raise InputError(
                f"weights for {stray}, which no ensemble is called: expected names among {list(self.ensembles)}"
            )

    @property
    def names(self) -> list[str]:
        """Every served model's name: the bundles', then the ensembles'."""
        return [*self.bundles, *self.ensembles]
        object.__setattr__(self, "allowed_hosts", check_allowed_hosts(self.allowed_hosts, "allowed_hosts"))


#: A model's name, as it stands in the protocol's paths (``/v2/models/NAME/infer``): ASCII letters, digits, ``-``,
#: ``_`` and ``.``, starting with a letter or digit (never ``.`` or ``..``, which URL paths resolve away).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: Any) -> None:
    """Refuse a model name outside :data:`MODEL_NAME` (:class:`~trainfer.errors.InputError`, naming it)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InputError(
            f"model name {name!r}: expected 1 to 128 ASCII letters, digits, '-', '_' and '.', starting with a letter "
            "or digit (it stands in URL paths, where '.' and '..' are resolved away; name it with --names)"
        )


#: The longest API key accepted (characters, each one byte): far below the 64 KiB a request's head may
#: hold (:data:`trainfer.server.header_limit.MAX_HEADER_BYTES`) and the 8 KiB many proxies allow a
#: header line, so that any client can send it.
MAX_API_KEY = 4096


def check_api_key(key: str | None, what: str) -> None:
    """Refuse a key (None passes) shorter than 16 characters, longer than :data:`MAX_API_KEY`, or
    holding any outside ``!`` to ``~``: HTTP strips the spaces at a header value's edges, control or
    non-ASCII characters are not portable in headers, and a header past the server's (or a proxy's)
    limit is refused, so such a key could never (or not reliably) be sent."""
    if key is None:
        return
    invisible = sum(not "!" <= c <= "~" for c in key)
    if not 16 <= len(key) <= MAX_API_KEY or invisible:
        raise InputError(
            f"{what} must be a key of at least 16 visible ASCII characters ('!' to '~': no spaces, control or "
            f"non-ASCII characters) and at most {MAX_API_KEY}; got {len(key)} characters, {invisible} of them "
            "outside '!' to '~'"
        )


def check_number(name: str, value: Any, least: float, most: float, integer: bool) -> None:
    """Refuse ``value`` (None passes) unless it is a finite number (an int where ``integer``) in [least, most]."""
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or not least <= value <= most
    ):
        kind = "an integer" if integer else "a finite number"
        raise InputError(f"{name} must be {kind} in [{least:g}, {most:g}]; got {value!r}")


def load_served(settings: ServerSettings, name: str) -> ServedModel:
    """Load and check the model ``settings`` serve as ``name``: a bundle (:func:`~trainfer.server.model.load_model`)
    or an ensemble (:func:`~trainfer.server.ensemble_model.load_ensemble`)."""
    options: dict[str, Any] = {
        "runtime": settings.runtime,
        "trust_factory": settings.trust_factory,
        "max_batch": settings.max_batch,
    }
    if name in settings.ensembles:
        return load_ensemble(name, settings.ensembles[name], settings.weights.get(name), **options)
    search = (settings.compile or {}).get(name)
    return load_model(name, settings.bundles[name], search=search, write_runtime=settings.write_runtime, **options)


def _joined(chunks: list[Any]) -> Any:
    """One output's rows of consecutive chunks, joined: arrays and tensors concatenated, lists (decoded
    results) chained."""
    if isinstance(chunks[0], np.ndarray):
        return np.concatenate(chunks)
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    return [row for chunk in chunks for row in chunk]


async def in_turn(turns: asyncio.Semaphore, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a worker thread once one of ``turns`` is free.

    The turn is held until the thread ends, also when the caller stops waiting (its timeout): a
    thread cannot be stopped, so at most as many threads as ``turns`` compute at once, however many
    callers gave up on theirs. A caller cancelled while waiting for its turn never starts its thread.
    """
    await turns.acquire()
    try:
        computing = asyncio.ensure_future(asyncio.to_thread(function, *args))
    except BaseException:
        turns.release()
        raise
    computing.add_done_callback(lambda done: _end_turn(turns, done))
    return await asyncio.shield(computing)  # a timeout stops the waiting, not the thread


def _end_turn(turns: asyncio.Semaphore, done: asyncio.Future[Any]) -> None:
    """Release a turn once its thread has ended; its error, if any, counts as seen (a caller that
    timed out no longer waits for it)."""
    turns.release()
    if not done.cancelled():
        done.exception()


def runs_inline(model: ServedModel) -> bool:
    """Whether ``model``'s lone requests may run on the event loop's thread (:class:`DynamicBatcher`'s ``inline``):
    its one-sample forward took under :data:`COMPUTE_BOUND` at load, and its cost does not depend on the
    inputs' values. A model that generates does not qualify: a sequence ending late (or never, up to its
    ``max_length``) costs many times the random inputs' decoding timed at load, and the loop would serve
    nothing else meanwhile."""
    fast = model.forward_seconds is not None and model.forward_seconds < COMPUTE_BOUND
    return fast and not model.generates


class HTTPError(Exception):
    """An answer other than 200, with its one-line message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class Server:
    """The served models, their batchers and the metrics of one app."""

    def __init__(
        self,
        settings: ServerSettings,
        on_fatal: Callable[[BaseException], None],
        on_ready: Callable[[], None] = lambda: None,
    ):
        self.settings = settings
        self.on_ready = on_ready
        self.metrics = Metrics(settings.max_batch)
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.on_fatal = on_fatal
        self.explaining = asyncio.Semaphore(1)  # one explanation at a time: each runs the model dozens of times
        self._decoding = asyncio.Semaphore(usable_cores())  # see decode

    @property
    def ready(self) -> bool:
        return len(self.batchers) == len(self.settings.names)

    async def load_all(self) -> None:
        """Load and check every bundle, in order, off the event loop; a failure stops the server."""
        settings = self.settings
        try:
            for name in settings.names:
                model = await asyncio.to_thread(load_served, settings, name)
                batcher = DynamicBatcher(
                    model.compute,
                    settings.max_batch,
                    settings.max_delay_ms / 1000,
                    settings.max_queue,
                    self.metrics.batch_stats(name),
                    settings.batch_workers or default_workers(model.forward_seconds),
                    inline=runs_inline(model),
                )
                batcher.start()
                self.models[name] = model
                self.batchers[name] = batcher
                source = settings.bundles.get(name) or settings.ensembles[name]
                logger.info("model %r ready (%s) from %s", name, model.serving(), source)
            self.on_ready()
        except Exception as error:  # a bundle that cannot be served: say why in one line and stop
            self.on_fatal(error)

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    def model(self, name: str) -> ServedModel:
        if name not in self.settings.bundles and name not in self.settings.ensembles:
            raise HTTPError(404, f"unknown model {name!r}: this server serves {self.settings.names}")
        if name not in self.batchers:
            raise HTTPError(503, f"model {name!r} is still loading", {"Retry-After": str(self.settings.retry_after)})
        return self.models[name]

    async def bounded(self, work: Awaitable[T]) -> T:
        """``work`` (a request's whole computation, once its body is read: decoding it, its wait for
        a batch, the batch, its answer's decoding), past the request timeout a 504. Work waiting is
        dropped; a thread already computing cannot be stopped and runs on, its answer dropped, still
        holding its turn (:meth:`decode`), so work past its timeout never piles up."""
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await work
        except TimeoutError:
            raise HTTPError(504, f"no answer within the request timeout of {self.settings.timeout:g} s") from None

    async def run(self, name: str, batch: torch.Tensor, top_k: int | None = None) -> list[Any]:
        """``batch``'s rows of every output (:meth:`ServedModel.compute`), through the model's dynamic
        batcher; ``top_k`` reaches a model that generates (its search depends on it). A request of more
        than ``max_batch`` samples runs as chunks of ``max_batch``, one after another: once its timeout
        passes (:meth:`bounded`), the chunk running finishes and the rest are never computed."""
        samples, size = batch.shape[0], self.settings.max_batch
        if not samples:
            raise InputError("empty input: expected at least one sample")
        key, batcher = self.models[name].key(top_k), self.batchers[name]
        try:
            if samples <= size:
                return await self._chunk(batcher, batch, 0, size, key)
            parts = [await self._chunk(batcher, batch, start, size, key) for start in range(0, samples, size)]
            return [_joined(list(rows)) for rows in zip(*parts, strict=True)]
        except Overloaded as error:
            raise HTTPError(503, f"overloaded: {error}; retry later", self._retry()) from None

    @staticmethod
    async def _chunk(batcher: DynamicBatcher, batch: torch.Tensor, start: int, size: int, key: Hashable) -> list[Any]:
        """The rows of ``batch[start : start + size]`` (the whole ``batch`` when it fits), a sample at
        fault named by its number in the whole request."""
        chunk = batch if start == 0 and batch.shape[0] <= size else batch[start : start + size]
        try:
            return await batcher.submit(chunk, key)
        except NonFiniteError as error:
            raise error.counted_from(start) from None

    async def decode(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a worker thread, at most one per core at once (:func:`in_turn`):
        decoding a large body (JSON numbers become Python objects, about 8x the body's bytes while
        parsed) or a sequence model's answers (a beam search per sample) off the event loop, with
        the memory and cores that take bounded by the cores, not by ``--max-connections``."""
        return await in_turn(self._decoding, function, *args)

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after)}

    async def body(self, receive: Receive, declared: str | None) -> bytes:
        """The request's body, read from its ASGI ``receive`` (``declared``: its Content-Length header,
        if any), refused with 413 as soon as it exceeds ``max_body`` bytes, and with 408 when it has
        not all arrived within the request timeout (a client trickling its body would otherwise hold
        its connection, one of ``--max-connections``, for as long as it likes). A client that leaves
        before its body has arrived raises Starlette's ``ClientDisconnect`` (answered 499)."""
        limit, timeout = self.settings.max_body, self.settings.timeout
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk, more = message.get("body", b""), message.get("more_body", False)
                    size += len(chunk)
                    if size > limit:
                        raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            late = f"the request body did not arrive within the request timeout of {timeout:g} s"
            raise HTTPError(408, late) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
