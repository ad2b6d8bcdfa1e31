"""The restart policy of ``trainfer serve --workers N``'s supervisor (:class:`trainfer.server.restarts.Restarts`),
on a clock the test moves: a worker that dies before it is ready fails its start, and the third failed
start in a row stops the server; a worker that was ready is always started again, with a growing,
bounded delay while it keeps dying soon after it is ready."""

from __future__ import annotations

import signal

import pytest

from trainfer.errors import TrainferError
from trainfer.server.restarts import FIRST_DELAY, MAX_DELAY, MAX_FAILED_STARTS, STABLE_SECONDS, Restarts, exit_status


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failed_starts_back_off_then_stop_the_server():
    restarts = Restarts(Clock())
    delays = []
    for _ in range(MAX_FAILED_STARTS - 1):
        restarts.started(0)
        delays.append(restarts.died(0, 1))
    assert delays == [FIRST_DELAY * 2**n for n in range(MAX_FAILED_STARTS - 1)]
    restarts.started(0)
    with pytest.raises(TrainferError, match=f"failed to start {MAX_FAILED_STARTS} times in a row.*killed by SIGSEGV"):
        restarts.died(0, -signal.SIGSEGV)


def test_a_ready_worker_resets_the_failed_starts_and_each_slot_counts_its_own():
    restarts = Restarts(Clock())
    for _ in range(MAX_FAILED_STARTS - 1):
        restarts.started(0)
        restarts.died(0, 1)
        restarts.started(1)
        restarts.died(1, 1)
    restarts.started(0)
    restarts.ready(0)
    restarts.died(0, 1)  # was ready: restarted, not counted as a failed start
    restarts.started(0)
    assert restarts.died(0, 1) == FIRST_DELAY  # the count started over
    restarts.started(1)
    with pytest.raises(TrainferError):
        restarts.died(1, 1)


def test_a_ready_worker_is_always_restarted_at_a_bounded_rate():
    clock = Clock()
    restarts = Restarts(clock)
    restarts.started(0)
    restarts.ready(0)
    clock.now += STABLE_SECONDS
    assert restarts.died(0, -signal.SIGKILL) == 0.0  # served long enough: at once
    delays = []
    for _ in range(20):  # each dies one second after it is ready
        restarts.started(0)
        restarts.ready(0)
        clock.now += 1
        delays.append(restarts.died(0, 1))
    assert delays[:3] == [FIRST_DELAY, 2 * FIRST_DELAY, 4 * FIRST_DELAY]
    assert delays == sorted(delays) and delays[-1] == MAX_DELAY
    restarts.started(0)
    restarts.ready(0)
    clock.now += STABLE_SECONDS
    assert restarts.died(0, 1) == 0.0  # a worker that served a while starts the count over


def test_exit_status_in_words():
    assert exit_status(1) == "exited with status 1"
    assert exit_status(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_status(None) == "ended with an unknown status"
