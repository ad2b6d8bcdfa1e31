"""``trainfer serve`` in a subprocess on a free loopback port, always stopped (tests and benchmarks).

Importable as ``server_process`` from the tests (pytest puts ``tests/`` on ``sys.path``) and from
``benchmarks/`` (which put ``tests/`` there themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).parent
#: Seconds a server may take to load and check its models (2 shared cores, torch imported cold).
START_TIMEOUT = 180.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server: its process, base URL and log file."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def access_records(self) -> list[dict]:
        """The structured access-log lines so far."""
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith('{"time"')]


def get(url: str, timeout: float = 10.0, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """``(status, body, headers)`` of a GET (errors are answers too)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def post(url: str, body: bytes, timeout: float = 30.0, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """``(status, body, headers)`` of a POST (errors are answers too)."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


@contextlib.contextmanager
def running_server(
    *args: str,
    env: dict | None = None,
    ready: bool = True,
    program: list[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[ServerProcess]:
    """``trainfer serve ARGS`` (or ``program ARGS``) on a free port, run in ``cwd`` (default: this one),
    until the block ends; killed if it does not stop in 20 s. Waits for ``/v2/health/ready`` (``ready``)
    or ``/v2/health/live`` to answer 200 first.
    """
    port = free_port()
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS.parent), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory(prefix="trainfer-serve-") as folder:
        log = Path(folder) / "server.log"
        with open(log, "wb") as stream:
            start = program or [sys.executable, "-m", "trainfer", "serve"]
            command = [*start, *args, "--port", str(port)]
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
        server = ServerProcess(process, port, log)
        try:
            _wait_until_up(server, "/v2/health/ready" if ready else "/v2/health/live")
            yield server
        finally:
            stop(server)


def stop(server: ServerProcess, grace: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(grace)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


def still_running(pids: list[int], limit: float) -> list[int]:
    """Those of processes ``pids`` still running after up to ``limit`` seconds of waiting for them all to exit."""
    deadline = time.monotonic() + limit
    while (left := list(filter(process_running, pids))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_running(pids: list[int]) -> None:
    """SIGKILL those of processes ``pids`` still running (the clean-up of a test that may have failed)."""
    for pid in still_running(pids, 0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie, whose new parent has not reaped it,
    has exited), from Linux's /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _wait_until_up(server: ServerProcess, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.logs()[-3000:]}")
        try:
            if get(server.url + path, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server did not answer {path} within {START_TIMEOUT} s:\n{server.logs()[-3000:]}")
