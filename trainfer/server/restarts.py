"""When the supervisor of ``trainfer serve --workers N`` starts a worker that died again, and when it
gives up (:class:`Restarts`).

A worker that died before it was ever ready (a crash at import, a segfault, the OOM killer at start)
failed to start: it is started again after a short backoff (:data:`FIRST_DELAY`, doubled each time),
and after :data:`MAX_FAILED_STARTS` failed starts in a row :meth:`Restarts.died` raises
:class:`~trainfer.errors.TrainferError`, which stops the server; a start that failed once is likely to
fail again, and restarting it at once and without end was a hot loop (20 start-ups in 25 s, never
ready, measured by an attacker). A worker that was ready and died later is always started again (that is what
a supervisor is for): at once when it had served :data:`STABLE_SECONDS`, otherwise after a backoff
doubled for each such early death in a row, at most :data:`MAX_DELAY`, so a worker that keeps dying soon
after it is ready restarts at a bounded rate.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from trainfer.errors import TrainferError

__all__ = ["FIRST_DELAY", "MAX_DELAY", "MAX_FAILED_STARTS", "STABLE_SECONDS", "Restarts", "exit_status"]

#: Failed starts in a row of one worker (each died before it was ready) that stop the server.
MAX_FAILED_STARTS = 3
#: Seconds before the first delayed restart; each further one in a row waits twice the one before.
FIRST_DELAY = 0.5
#: Most seconds a worker that was ready waits before it is started again.
MAX_DELAY = 30.0
#: Seconds a ready worker must have served for its death not to count as an early one.
STABLE_SECONDS = 60.0


@dataclass
class _Slot:
    """One worker's place: its current worker's readiness, and its deaths in a row."""

    ready_at: float | None = None
    failed_starts: int = 0
    early_deaths: int = 0


class Restarts:
    """The restart policy of a supervisor's workers, each known by its slot (its index among them).

    The supervisor calls :meth:`started` when it starts a worker in a slot, :meth:`ready` when it sees
    that worker ready (its server serves), and :meth:`died` when it finds the worker dead; ``clock``
    gives the time in seconds (monotonic).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots: dict[int, _Slot] = {}

    def started(self, slot: int) -> None:
        """A new worker was started in ``slot``: not ready yet."""
        self._slot(slot).ready_at = None

    def is_ready(self, slot: int) -> bool:
        """Whether the worker of ``slot`` has been seen ready."""
        return self._slot(slot).ready_at is not None

    def ready(self, slot: int) -> None:
        """The worker of ``slot`` was seen ready: its start succeeded."""
        state = self._slot(slot)
        if state.ready_at is None:
            state.ready_at = self._clock()
            state.failed_starts = 0

    def died(self, slot: int, exitcode: int | None) -> float:
        """Seconds to wait before starting the worker of ``slot`` again, now that it died with
        ``exitcode``; raises :class:`~trainfer.errors.TrainferError` once its starts failed
        :data:`MAX_FAILED_STARTS` times in a row."""
        state = self._slot(slot)
        if state.ready_at is None:
            state.failed_starts += 1
            if state.failed_starts >= MAX_FAILED_STARTS:
                raise TrainferError(
                    f"a worker failed to start {state.failed_starts} times in a row (each died before it was "
                    f"ready, the last {exit_status(exitcode)}; the log above may say why): the server stopped"
                )
            return _backoff(state.failed_starts)
        served = self._clock() - state.ready_at
        state.early_deaths = state.early_deaths + 1 if served < STABLE_SECONDS else 0
        return 0.0 if state.early_deaths == 0 else _backoff(state.early_deaths)

    def _slot(self, slot: int) -> _Slot:
        return self._slots.setdefault(slot, _Slot())


def _backoff(deaths: int) -> float:
    """The delay after ``deaths`` (>= 1) deaths in a row: :data:`FIRST_DELAY` doubled, at most :data:`MAX_DELAY`."""
    return min(MAX_DELAY, FIRST_DELAY * 2 ** (deaths - 1))


def exit_status(exitcode: int | None) -> str:
    """A worker process's ``exitcode`` in words: "exited with status 1", "killed by SIGSEGV"."""
    if exitcode is None:
        return "ended with an unknown status"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
