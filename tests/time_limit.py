"""A wall-clock limit for code that might hang: a hang fails the test instead of stalling CI."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block if it runs longer than ``seconds`` (SIGALRM, main thread only).

    The alarm interrupts Python code (a folding loop that never ends) at its next bytecode; the
    previous handler and timer are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("time_limit needs the main thread (it uses SIGALRM)")

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
