"""Dynamic batching: requests arriving close together run as one batch, and each gets its rows back.

A request is a batch of ``n >= 1`` preprocessed samples. Batches run one at a time, in a worker
thread, so the event loop keeps accepting (and refusing) requests while the model computes; the
requests that arrive meanwhile are the next batch's. When to run (Triton's rule, collecting only
while the model is busy):

- a request that finds the model idle and nobody waiting runs at once, alone with whatever arrived
  in the same instant: a lone request never waits for companions that may never come;
- requests that arrived while the model was busy run when it frees, once ``max_batch`` samples are
  waiting or the oldest has waited ``max_delay`` seconds since its arrival, whichever comes first
  (a model slower than ``max_delay`` thus runs the next batch at once).

A batch is the oldest waiting requests concatenated in arrival order -- requests of different sizes
together, never splitting one -- up to ``max_batch`` samples; a request holding more than
``max_batch`` samples runs alone. The model runs once on it and each request gets its own rows.
A request may carry a ``key`` (a sequence model's ``top_k``): a batch holds requests of one key
only (it stops at the first of another key, so order is kept) and runs ``run(batch, key)``
instead of ``run(batch)``.
The worker thread runs with the torch (OpenMP) thread count of the thread that made the batcher.

Memory is bounded: at most ``max_queue`` samples wait; a request that would exceed that is refused
at once with :class:`Overloaded` (the server answers 503 with ``Retry-After``). A request whose
caller stopped waiting (a timeout, a closed connection) is dropped before its batch is formed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainfer.errors import InputError

__all__ = ["BatchStats", "DynamicBatcher", "Overloaded"]


class Overloaded(Exception):
    """The queue is full: the request was not accepted (retry later)."""


@dataclass
class BatchStats:
    """Observers of the batcher: called with the queue depth (samples) and each batch's size and seconds."""

    queue_depth: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, float], None] = lambda samples, seconds: None


@dataclass
class _Pending:
    batch: Tensor
    future: asyncio.Future[list[Any]]
    key: Hashable = None
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batch ``run`` (a batch ``(N, ...)`` -> a list of per-output ``(N, ...)`` tensors, or of lists of
    ``N`` items) across requests.

    Start it with :meth:`start` inside the running event loop and stop it with :meth:`stop`
    (requests already queued are finished first).
    """

    def __init__(
        self,
        run: Callable[..., list[Any]],
        max_batch: int,
        max_delay: float,
        max_queue: int,
        stats: BatchStats | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise InputError(
                f"need max_batch >= 1, max_queue >= 1, max_delay >= 0; got {max_batch, max_queue, max_delay}"
            )
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay, max_queue
        self.stats = stats or BatchStats()
        self._waiting: deque[_Pending] = deque()
        self._queued = 0
        self._arrival = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="trainfer-batch",
            initializer=torch.set_num_threads,  # OpenMP keeps a thread count per thread: give it the caller's
            initargs=(torch.get_num_threads(),),
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queued(self) -> int:
        """Samples waiting for a batch."""
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish every queued request, then stop the loop and the worker thread."""
        self._closing = True
        self._arrival.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, batch: Tensor, key: Hashable = None) -> list[Any]:
        """The outputs' rows for ``batch`` (raises :class:`Overloaded` when the queue is full); ``key``:
        see the module docstring."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        if self._queued + len(batch) > self.max_queue and self._queued:
            raise Overloaded(f"{self._queued} samples are waiting (at most {self.max_queue})")
        pending = _Pending(batch, asyncio.get_running_loop().create_future(), key)
        self._waiting.append(pending)
        self._add(len(batch))
        self._arrival.set()
        return await pending.future

    def _add(self, samples: int) -> None:
        self._queued += samples
        self.stats.queue_depth(self._queued)

    async def _loop(self) -> None:
        found_idle = True  # the waiting requests arrived while no batch ran and none waited
        while True:
            if not self._waiting:
                if self._closing:
                    return
                self._arrival.clear()
                await self._arrival.wait()
                found_idle = True
                continue
            if not found_idle:
                await self._gather()
            found_idle = False
            taken = self._take()
            if taken:
                await self._run(taken)

    async def _gather(self) -> None:
        """Wait until ``max_batch`` samples are queued or the oldest request has waited ``max_delay``."""
        deadline = self._waiting[0].arrived + self.max_delay
        while self._queued < self.max_batch and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """The oldest live requests of one key whose samples fit in ``max_batch`` (at least one request)."""
        taken: list[_Pending] = []
        samples = 0
        while self._waiting:
            pending = self._waiting[0]
            if pending.future.done():  # its caller gave up: never computed
                self._waiting.popleft()
                self._add(-len(pending.batch))
                continue
            if taken and (samples + len(pending.batch) > self.max_batch or pending.key != taken[0].key):
                break
            self._waiting.popleft()
            self._add(-len(pending.batch))
            taken.append(pending)
            samples += len(pending.batch)
        return taken

    async def _run(self, taken: list[_Pending]) -> None:
        joined = taken[0].batch if len(taken) == 1 else torch.cat([p.batch for p in taken])
        keyed = () if taken[0].key is None else (taken[0].key,)
        start = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.run, joined, *keyed)
        except Exception as error:  # the model failed: every request of the batch hears why
            for pending in taken:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        self.stats.batch(len(joined), time.perf_counter() - start)
        first = 0
        for pending in taken:
            rows = slice(first, first + len(pending.batch))
            first = rows.stop
            if not pending.future.done():
                pending.future.set_result([output[rows] for output in outputs])
