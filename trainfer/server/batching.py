"""Dynamic batching: requests arriving close together run as one batch, and each gets its rows back.

A request is a batch of ``n >= 1`` preprocessed samples. Batches run in ``workers`` worker threads
(at most ``workers`` batches at once; 1 by default), so the event loop keeps accepting (and
refusing) requests while the model computes; the requests that arrive meanwhile are the next
batch's. When to run (Triton's rule, collecting only while the model is busy):

- a request that finds the model idle (no batch running) and nobody waiting runs at once, alone
  with whatever arrived in the same instant: a lone request never waits for companions that may
  never come;
- requests that arrived while a batch runs gather until ``max_batch`` samples wait or the oldest
  has waited ``max_delay`` seconds since its arrival, whichever comes first, then run on the first
  free worker (a model slower than ``max_delay`` thus runs the next batch as soon as a worker is
  free). A free second worker does not run a request at once while the model is busy: that request
  gathers too, then runs there with whatever joined it. On a small model whose per-request Python
  outweighs its forward, one-sample batches run at once only contended for the interpreter lock
  and scattered the latencies (digits_net's p99 at concurrency 32 went from 14 to 9 ms with 2
  workers, machine B).
- with ``inline``, a lone one-sample request on an idle model that follows a batch of one request
  (serial traffic: concurrency 1) runs on the event loop's own thread, not a worker's: for a model
  whose one-sample forward is under :data:`COMPUTE_BOUND` the hand-off to a worker thread and back
  costs a third of that forward (digits_net, machine B: 0.13 ms around a 0.37 ms forward). The loop
  then serves nothing else for that one forward, so a request of several samples (its forward
  grows with them: 16384 digits samples take 1.7 s) always runs on a worker; so do concurrent
  requests, whose batches are larger than one, so that the loop reads the next requests meanwhile
  and answers health checks, metrics and overload (503) while the model computes, however long it
  takes. (Running every batch of a fast model on the loop's thread answered 3-5 % more requests at
  concurrency 8 and 32 on a quiet machine, 40 % more on a loaded one, but a batch that took far
  longer than its forerunners, a model stalled on anything, then held the whole server: no 503,
  no metrics, no signal handled until it returned. Measured and dropped: docs/serving.md.)

A batch is the oldest waiting requests concatenated in arrival order -- requests of different sizes
together, never splitting one -- up to ``max_batch`` samples; a request holding more than
``max_batch`` samples runs alone. The model runs once on it and each request gets its own rows.
When that run raises, the batch's requests run again one by one, so that each hears its own answer
or error: one request's values (NaN scores, a model error) never fail the others of its batch.
A request may carry a ``key`` (a sequence model's ``top_k``): a batch holds requests of one key
only (it stops at the first of another key, so order is kept) and runs ``run(batch, key)``
instead of ``run(batch)``.
Each worker thread runs with the torch (OpenMP) thread count of the thread that made the batcher,
so ``workers`` x that count is the cores the batcher may use: on a CPU, where a batch gains little
per sample over one sample, several workers of one thread each keep every core busy (see
:func:`default_workers`).

Memory is bounded: at most ``max_queue`` samples wait; a request that would exceed that is refused
at once with :class:`Overloaded` (the server answers 503 with ``Retry-After``). A request whose
caller stopped waiting (a timeout, a closed connection) is dropped before its batch is formed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainfer.errors import InputError

__all__ = ["COMPUTE_BOUND", "BatchStats", "DynamicBatcher", "Overloaded", "default_workers", "usable_cores"]


#: A one-sample forward shorter than this (seconds) leaves a server bound by its event loop's Python,
#: not by the cores: :func:`default_workers` then runs one batch at a time.
COMPUTE_BOUND = 1e-3


def default_workers(forward_seconds: float | None = None) -> int:
    """Batches to run at once by default: the cores this process may use over torch's threads per
    forward, or 1 for a model whose one-sample forward takes under :data:`COMPUTE_BOUND`.

    With torch's default (one thread per core) that is 1, one batch at a time using every core; with
    one thread per forward (``OMP_NUM_THREADS=1``, the setting for many small concurrent requests)
    it is one worker per core, as a per-request thread pool would use them. A fast model
    (``forward_seconds``, e.g. digits_net's 0.2 ms) gains nothing from a second worker: the requests'
    Python on the event loop is the bottleneck, and a second batch only contends for the interpreter lock.
    """
    if forward_seconds is not None and forward_seconds < COMPUTE_BOUND:
        return 1
    return max(1, usable_cores() // max(1, torch.get_num_threads()))


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Overloaded(Exception):
    """The queue is full: the request was not accepted (retry later)."""


@dataclass
class BatchStats:
    """Observers of the batcher: called with the queue depth (samples) and each batch's size and seconds
    in the model (timed on the thread that runs it)."""

    queue_depth: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, float], None] = lambda samples, seconds: None


@dataclass
class _Pending:
    batch: Tensor
    future: asyncio.Future[list[Any]]
    key: Hashable = None
    arrived: float = field(default_factory=time.monotonic)
    size: int = field(init=False)  # samples (``len(batch)``, read once: Tensor.__len__ is slow Python)

    def __post_init__(self) -> None:
        self.size = self.batch.shape[0]


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
        workers: int = 1,
        inline: bool = False,
    ):
        """``run``: see the class docstring; ``inline``: see the module docstring (the batch threads'
        count is ``workers``; every other parameter is the server setting of the same name)."""
        if max_batch < 1 or max_queue < 1 or max_delay < 0 or workers < 1:
            raise InputError(
                "need max_batch >= 1, max_queue >= 1, max_delay >= 0, workers >= 1; "
                f"got {max_batch, max_queue, max_delay, workers}"
            )
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay, max_queue
        self.workers, self.inline = workers, inline
        self.stats = stats or BatchStats()
        self._waiting: deque[_Pending] = deque()
        self._queued = 0
        self._busy = 0  # batches running
        self._running: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()  # a request arrived or a batch finished
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="trainfer-batch",
            initializer=torch.set_num_threads,  # OpenMP keeps a thread count per thread: give it the caller's
            initargs=(torch.get_num_threads(),),
        )
        self._task: asyncio.Task[None] | None = None
        self._lone = False  # the last batch was one request
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
        self._changed.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(self, batch: Tensor, key: Hashable = None) -> asyncio.Future[list[Any]]:
        """A future of the outputs' rows for ``batch`` (raises :class:`Overloaded` at once when the queue
        is full); cancelling it drops the request before its batch is formed. ``key``: see the module docstring."""
        if self._closing:
            raise Overloaded("the server is shutting down")
        pending = _Pending(batch, asyncio.get_running_loop().create_future(), key)
        if self._queued + pending.size > self.max_queue and self._queued:
            raise Overloaded(f"{self._queued} samples are waiting (at most {self.max_queue})")
        self._waiting.append(pending)
        self._add(pending.size)
        if len(self._waiting) == 1 or self._queued >= self.max_batch:  # else nothing the loop waits for changed
            self._changed.set()
        return pending.future

    def _add(self, samples: int) -> None:
        self._queued += samples
        self.stats.queue_depth(self._queued)

    async def _loop(self) -> None:
        found_idle = True  # the waiting requests arrived while the model was idle and none waited
        while True:
            if not self._waiting:
                if self._closing:
                    break
                await self._change()
                found_idle = self._busy == 0
                continue
            if self._busy >= self.workers:
                await self._change()
                found_idle = False
                continue
            if not found_idle:
                await self._gather()
            taken = self._take()
            if taken and found_idle and self.inline and self._lone and len(taken) == 1 and taken[0].size == 1:
                self._run_here(taken[0])
            elif taken:
                self._start(taken)
            self._lone = len(taken) == 1
            found_idle = False
        if self._running:
            await asyncio.wait(self._running)

    async def _change(self) -> None:
        """Until a request arrives in an empty queue, ``max_batch`` samples wait, or a batch finishes
        (what the loop may act on: :meth:`submit` wakes it for nothing else)."""
        self._changed.clear()
        await self._changed.wait()

    def _start(self, taken: list[_Pending]) -> None:
        self._busy += 1
        task = asyncio.get_running_loop().create_task(self._run(taken))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._busy -= 1
        self._changed.set()

    async def _gather(self) -> None:
        """Wait until ``max_batch`` samples are queued or the oldest request has waited ``max_delay``."""
        deadline = self._waiting[0].arrived + self.max_delay
        while self._queued < self.max_batch and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
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
                self._add(-pending.size)
                continue
            if taken and (samples + pending.size > self.max_batch or pending.key != taken[0].key):
                break
            self._waiting.popleft()
            self._add(-pending.size)
            taken.append(pending)
            samples += pending.size
        return taken

    async def _run(self, taken: list[_Pending]) -> None:
        """Run ``taken`` on a worker thread: each request gets its rows, or, when the batch raises, its own
        answer or error from a run alone."""
        joined = taken[0].batch if len(taken) == 1 else torch.cat([p.batch for p in taken])
        loop = asyncio.get_running_loop()
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._timed, joined, taken[0].key)
        except Exception as error:  # each request hears its own answer or error: run them one by one
            if len(taken) == 1:
                _settle_each(taken, [error])
            else:
                await self._run_alone(taken)
            return
        self._answer(taken, outputs, seconds)

    async def _run_alone(self, taken: list[_Pending]) -> None:
        """Each request of ``taken`` run alone on a worker thread, given its own answer or error."""
        answers = await asyncio.get_running_loop().run_in_executor(self._executor, self._alone, taken)
        _settle_each(taken, answers)

    def _run_here(self, pending: _Pending) -> None:
        """Run a lone request on the event loop's thread (``inline``): its rows or its error."""
        try:
            outputs, seconds = self._timed(pending.batch, pending.key)
        except Exception as error:
            _settle_each([pending], [error])
            return
        self._answer([pending], outputs, seconds)

    def _answer(self, taken: list[_Pending], outputs: list[Any], seconds: float) -> None:
        """Each request of ``taken`` given its rows of ``outputs``; the batch's ``seconds`` recorded."""
        self.stats.batch(sum(p.size for p in taken), seconds)
        if len(taken) == 1:  # a lone request (concurrency 1's every request): its rows are all the rows
            if not taken[0].future.done():
                taken[0].future.set_result(outputs)
            return
        first = 0
        for pending in taken:
            rows = slice(first, first + pending.size)
            first = rows.stop
            if not pending.future.done():
                pending.future.set_result([output[rows] for output in outputs])

    def _timed(self, batch: Tensor, key: Hashable) -> tuple[list[Any], float]:
        """:meth:`_keyed_run` and its seconds, timed on the thread that runs it: the wait for a worker
        thread and the hop back to the event loop are the server's time, not the model's."""
        start = time.perf_counter()
        outputs = self._keyed_run(batch, key)
        return outputs, time.perf_counter() - start

    def _keyed_run(self, batch: Tensor, key: Hashable) -> list[Any]:
        """``run(batch)``, or ``run(batch, key)`` for requests that carry a key."""
        return self.run(batch) if key is None else self.run(batch, key)

    def _alone(self, taken: list[_Pending]) -> list[Any]:
        """Each request of a failed batch run alone: its outputs, or the exception it raised."""
        answers: list[Any] = []
        for pending in taken:
            try:
                answers.append(self._keyed_run(pending.batch, pending.key))
            except Exception as error:
                answers.append(error)
        return answers


def _settle_each(taken: list[_Pending], answers: list[Any]) -> None:
    """Each live request of ``taken`` given its answer: raised when it is an exception, else its result."""
    for pending, answer in zip(taken, answers, strict=True):
        if pending.future.done():
            continue
        if isinstance(answer, BaseException):
            pending.future.set_exception(answer)
        else:
            pending.future.set_result(answer)
