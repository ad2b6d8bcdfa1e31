"""``trainfer serve --workers N``: uvicorn's supervisor process and its worker processes, tied together.

Promises that uvicorn's own multi-process supervisor does not keep:

* the supervisor ends as a single-process server does (:func:`supervise`): after SIGTERM by
  that signal (143 in a shell), after Ctrl-C with ``KeyboardInterrupt`` (the CLI's 130), once its
  workers have shut down gracefully, the port refusing new connections meanwhile;
* a worker never outlives its supervisor (:func:`exit_with_parent`), however the supervisor died
  (SIGKILL included): otherwise orphaned workers keep serving the port;
* a worker leaves no semaphore behind (:func:`thread_locks_for_progress_bars`): otherwise
  multiprocessing's resource tracker warns of "leaked semaphore objects" as the server stops;
* a worker that cannot serve, or keeps dying before it is ready, stops the server, and one that dies
  after it was ready is restarted at a bounded rate (:func:`supervise`, :mod:`trainfer.server.restarts`):
  uvicorn starts another at once, without end;
* a worker imports nothing from the current directory (:func:`supervise`): spawned processes start
  as ``python -c ...``, which puts the current directory first on ``sys.path``, so a
  ``multiprocessing.py`` in a downloaded bundle's folder ran in every worker (attacker round 11).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from trainfer.errors import BundleError, TrainferError
from trainfer.server.restarts import Restarts, exit_status

if TYPE_CHECKING:
    import uvicorn

__all__ = ["PARENT_POLL", "exit_with_parent", "supervise", "thread_locks_for_progress_bars"]

#: Seconds between two looks at the parent where the kernel cannot signal its death (not Linux).
PARENT_POLL = 0.5
#: ``prctl``'s option that asks for a signal when the parent dies (<linux/prctl.h>).
_PR_SET_PDEATHSIG = 1
#: Seconds the supervisor waits for a starting worker to say whether it is ready yet.
_READY_PROBE = 1.0
#: Python 3.11's ``-P`` as an environment variable: no potentially unsafe path (the current directory
#: of ``python -c``) is put on ``sys.path`` of the interpreters multiprocessing spawns.
_SAFE_PATH = "PYTHONSAFEPATH"


def supervise(config: uvicorn.Config) -> None:
    """Run ``config.workers`` processes serving ``config``'s app (named by import string) on one socket
    until SIGTERM or Ctrl-C (SIGINT), or until a worker cannot serve: a worker that says it cannot
    (its bundle gone or broken: it exits with uvicorn's ``STARTUP_FAILURE``,
    :func:`trainfer.server.run.app_from_environment`) stops the supervisor with
    :class:`~trainfer.errors.BundleError` (attacker round 12); a worker that keeps dying before it is
    ready, before trainfer's code runs (a crash at import, a segfault), stops it with
    :class:`~trainfer.errors.TrainferError` after a few tries (:mod:`trainfer.server.restarts`). A worker
    that was ready and died is started again, at a bounded rate. uvicorn's own supervisor starts
    another worker at once, without end, in both cases.

    The workers then shut down gracefully (each answers the requests it received), and the signal
    that stopped the supervisor is raised again under the handlers that were in place before
    uvicorn's, as a single uvicorn server does: SIGTERM's default handler ends the process by that
    signal; Python's SIGINT handler raises ``KeyboardInterrupt``. Any other end returns normally.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import SIGNALS, Multiprocess, Process, logger

    before = {number: signal.getsignal(number) for number in SIGNALS}
    stopped_by: list[int] = []
    failures: list[BaseException] = []
    safe_path = os.environ.get(_SAFE_PATH)

    class _Supervisor(Multiprocess):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.restarts = Restarts()
            self.restart_at: dict[int, float] = {}  # slot -> when its dead worker is started again

        def init_processes(self) -> None:
            super().init_processes()
            for slot in range(len(self.processes)):
                self.restarts.started(slot)

        def keep_subprocess_alive(self) -> None:
            """uvicorn's, with :class:`~trainfer.server.restarts.Restarts` deciding when a dead worker
            is started again, and whether the server stops instead."""
            for slot, process in enumerate(self.processes):
                if self.should_exit.is_set():
                    return
                if slot in self.restart_at:
                    if process.process.is_alive():  # replaced meanwhile (SIGHUP: uvicorn's restart_all)
                        del self.restart_at[slot]
                        self.restarts.started(slot)
                    elif time.monotonic() >= self.restart_at[slot]:
                        del self.restart_at[slot]
                        self.start_worker(slot)
                elif not self.serving(slot, process):
                    self.replace(slot, process)

        def serving(self, slot: int, process: Any) -> bool:
            """Whether the worker of ``slot`` lives and answers the health check; noted ready once it is."""
            if not process.process.is_alive():
                return False
            if not self.restarts.is_ready(slot) and process.is_ready(timeout=_READY_PROBE):
                logger.info(f"Child process [{process.pid}] is ready")
                self.restarts.ready(slot)
            return process.is_alive(timeout=self.config.timeout_worker_healthcheck)

        def replace(self, slot: int, process: Any) -> None:
            """Kill the dead or hung worker of ``slot``; schedule its successor, or stop the server."""
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                logger.error(f"Child process [{process.pid}] cannot serve, stopping the parent process.")
                failures.append(
                    BundleError("a worker could not serve (its reason is logged above): the server stopped")
                )
                self.should_exit.set()
                return
            try:
                delay = self.restarts.died(slot, process.exitcode)
            except TrainferError as error:
                logger.error(f"Child process [{process.pid}] {exit_status(process.exitcode)}: {error}")
                failures.append(error)
                self.should_exit.set()
                return
            logger.info(
                f"Child process [{process.pid}] {exit_status(process.exitcode)}; starting another in {delay:.1f} s"
            )
            self.restart_at[slot] = time.monotonic() + delay

        def start_worker(self, slot: int) -> None:
            process = Process(self.config, self.sockets)
            process.start()
            self.processes[slot] = process
            self.restarts.started(slot)

        def handle_int(self) -> None:
            stopped_by.append(signal.SIGINT)
            super().handle_int()
            self.stop_listening()

        def handle_term(self) -> None:
            stopped_by.append(signal.SIGTERM)
            super().handle_term()
            self.stop_listening()

        def stop_listening(self) -> None:
            """Close the supervisor's copy of the listening socket as the shutdown begins: the workers
            close theirs as they stop accepting, and the port then refuses new connections at once.
            Held open while the workers drain, it let the kernel complete connections that no worker
            would accept, each reset when the supervisor exited (13 of 16 clients opening a connection
            a request, against 1 with a single process: attacker round 5 M-2)."""
            for listening in self.sockets:
                listening.close()

    os.environ[_SAFE_PATH] = "1"  # inherited by every process spawned from here, restarted workers too
    supervisor = _Supervisor(config, sockets=[config.bind_socket()])
    try:
        supervisor.run()
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
        _restore(_SAFE_PATH, safe_path)
    if stopped_by:
        signal.raise_signal(stopped_by[0])
    if failures:
        raise failures[0]


def _restore(name: str, value: str | None) -> None:
    """The environment variable ``name`` set back to ``value`` (None: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def exit_with_parent() -> None:
    """In a worker process started by :mod:`multiprocessing` (uvicorn's are): SIGTERM this process
    -- a graceful shutdown in a uvicorn server -- as soon as its parent dies, however it died. Call
    it first thing in the worker; elsewhere (no multiprocessing parent) it does nothing.

    On Linux the kernel sends the signal (``prctl(PR_SET_PDEATHSIG)``; the parent's thread that
    started the worker must live as long as the parent, as uvicorn's main thread does); a parent
    already gone when it is asked is caught by comparing ``os.getppid()`` with the parent's pid
    right after. Elsewhere a daemon thread compares them every :data:`PARENT_POLL` seconds: enough
    where an orphan gets a new parent (macOS, the BSDs), not on Windows, where it keeps its parent id.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if not _signal_on_parent_death(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(parent.pid,), name="trainfer-parent-watch", daemon=True).start()
    if os.getppid() != parent.pid:  # died before the kernel was asked to tell
        os.kill(os.getpid(), signal.SIGTERM)


def thread_locks_for_progress_bars() -> None:
    """In a worker process: tqdm's progress bars share a thread lock, not tqdm's default one, which
    also holds a multiprocessing lock. Call it before any bar is built.

    A worker builds bars, disabled ones included: torch.fx's interpreter, which checks a bundle's
    recorded architecture, builds one. The first bar of a process makes tqdm's lock, and in a process
    started by spawn (uvicorn's workers are) its multiprocessing half is a named POSIX semaphore
    that multiprocessing's exit handlers would unlink. A uvicorn worker ends by re-raising SIGTERM
    after its graceful shutdown, so they never run, and the resource tracker warns of a leaked
    semaphore per worker as the server stops (and unlinks them then). A worker draws no bar that
    another process shares: a thread lock is all it needs.
    """
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _signal_on_parent_death(number: int) -> bool:
    """Ask Linux to send signal ``number`` to this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0) == 0
    return False


def _watch_parent(parent: int) -> None:
    """Poll until this process's parent is no longer ``parent``, then SIGTERM this process."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os.kill(os.getpid(), signal.SIGTERM)
