"""How ``trainfer serve`` ends on a signal, in a real server process, alone and with ``--workers 2`` alike:
Ctrl-C (SIGINT) after the graceful shutdown exits quietly with the shell's 130 (not click's
``Aborted!`` and 1, which docs/security.md's exit codes give to a negative verdict); SIGTERM ends
it by that signal, re-raised after the graceful shutdown. SIGKILL of a multi-worker server's
supervisor stops its workers too (they would otherwise keep serving the port). No process leaves a
semaphore behind for multiprocessing's resource tracker to warn about."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_process import START_TIMEOUT, free_port, get, kill_running, running_server, still_running
from serving_models import gated_digits_bundle
from time_limit import time_limit

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # a server subprocess: torch imported cold, the model loaded

#: Seconds a served tiny model may take to shut down gracefully before the test fails.
SHUTDOWN_LIMIT = 60
#: How a signal ends the server, whatever its number of worker processes.
STATUS = {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A deployed model: loading it runs torch.fx's interpreter over its recorded architecture, which
    builds a (disabled) tqdm bar, whose first one in a process makes tqdm's multiprocessing lock."""
    root = tmp_path_factory.mktemp("signals")
    gated_digits_bundle(root, "tiny")
    return root / "tiny"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_the_server_gracefully_with_its_status_and_no_abort_message(bundle, sent, workers):
    with running_server(str(bundle), "--workers", workers) as server:
        children = child_processes(server.process.pid)  # the workers and multiprocessing's resource tracker
        server.process.send_signal(sent)
        status = server.process.wait(SHUTDOWN_LIMIT)  # TimeoutExpired fails the test; the block then kills it
        assert not still_running(children, SHUTDOWN_LIMIT)  # the tracker writes its warnings as it ends
        logs = server.logs()
    assert status == STATUS[sent], logs[-3000:]
    # uvicorn's graceful shutdown ran to its end in every server process
    assert logs.count("Finished server process") == int(workers), logs[-3000:]
    assert "Aborted!" not in logs and "Traceback" not in logs, logs[-3000:]
    assert "leaked" not in logs and "resource_tracker" not in logs, logs[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
def test_sigkill_of_the_supervisor_stops_its_workers(bundle):
    with running_server(str(bundle), "--workers", "2") as server:
        workers = worker_processes(server.process.pid)
        try:
            assert len(workers) == 2, workers
            server.process.kill()
            server.process.wait(SHUTDOWN_LIMIT)
            assert not still_running(workers, SHUTDOWN_LIMIT), (workers, server.logs()[-3000:])
            with pytest.raises(OSError):  # nothing serves the port any more
                get(server.url + "/v2/health/live", timeout=5)
        finally:
            kill_running(workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
def test_a_ready_worker_that_dies_is_started_again_each_time(bundle):
    """A worker killed while it serves (the OOM killer) is replaced, not counted as a failed start: killed
    three times, each time once its successor is ready, the server still serves."""
    with running_server(str(bundle), "--workers", "2") as server:
        before = worker_processes(server.process.pid)
        wait_until_ready(server, before)  # the server answers as soon as one worker is
        for _ in range(3):
            os.kill(before[0], signal.SIGKILL)
            try:
                with time_limit(START_TIMEOUT):  # a worker never replaced fails the test
                    while not (new := set(worker_processes(server.process.pid)) - set(before)):
                        time.sleep(0.2)
            except TimeoutError:
                raise AssertionError(server.logs()[-3000:]) from None
            wait_until_ready(server, new)
            assert f"[{before[0]}] killed by SIGKILL; starting another in" in server.logs()
            before = [min(new), *before[1:]]
        assert server.process.poll() is None, server.logs()[-3000:]
        assert get(server.url + "/v2/health/ready")[0] == 200


def wait_until_ready(server, workers) -> None:
    """Until the supervisor of ``server`` has seen each of ``workers`` ready (its log says so)."""
    try:
        with time_limit(START_TIMEOUT):  # a worker never seen ready fails the test
            while not all(f"[{pid}] is ready" in server.logs() for pid in workers):
                time.sleep(0.2)
    except TimeoutError:
        raise AssertionError(server.logs()[-3000:]) from None


def worker_processes(supervisor: int) -> list[int]:
    """The pids of uvicorn's worker processes under ``supervisor`` (its multiprocessing-spawned
    children, not multiprocessing's resource tracker), from Linux's /proc."""
    return [pid for pid in child_processes(supervisor) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def child_processes(parent: int) -> list[int]:
    """The pids of the children of ``parent``, from Linux's /proc (none elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    return [
        int(pid) for task in Path(f"/proc/{parent}/task").iterdir() for pid in (task / "children").read_text().split()
    ]


#: A ``multiprocessing.py`` left in a downloaded bundle's folder (attacker round 11, F1): imported, it
#: leaves a file named after its process, then steps aside for the real module so nothing looks wrong.
TRAP = """
import importlib, os, sys
here = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(here, f"ran-in-{os.getpid()}"), "w").close()
sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]
del sys.modules["multiprocessing"]
sys.modules["multiprocessing"] = importlib.import_module("multiprocessing")
"""


@pytest.mark.skipif(not Path(sys.executable).with_name("trainfer").exists(), reason="needs the trainfer command")
def test_workers_import_nothing_from_the_current_directory(bundle, tmp_path):
    """``trainfer serve . --workers 2`` run in a folder holding a ``multiprocessing.py``: the workers
    (spawned as ``python -c``, which puts the current directory first on ``sys.path``) never import it."""
    folder = tmp_path / "downloaded"
    shutil.copytree(bundle, folder)
    (folder / "multiprocessing.py").write_text(TRAP)
    command = [str(Path(sys.executable).with_name("trainfer")), "serve"]
    with running_server(".", "--workers", "2", program=command, cwd=folder) as server:
        assert len(worker_processes(server.process.pid)) == 2
    assert sorted(p.name for p in folder.glob("ran-in-*")) == []


#: The supervisor of two workers whose bundle is gone by the time they load it (the parent's check
#: skipped, as when the bundle is deleted right after it): it must stop, not restart them without end.
GONE = """
import sys

from trainfer.errors import BundleError
from trainfer.server import run
from trainfer.server.state import ServerSettings

if __name__ == "__main__":  # spawned workers run this file's top again
    from server_process import free_port

    run.check_bundles = lambda settings: None
    try:
        run.serve(ServerSettings(bundles={"gone": sys.argv[1]}), port=free_port(), workers=2)
    except BundleError as error:
        print("refused:", error)
        sys.exit(7)
"""


def test_workers_that_cannot_serve_stop_the_supervisor_instead_of_being_restarted(tmp_path):
    script = tmp_path / "gone.py"
    script.write_text(GONE)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "no-bundle")],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert done.returncode == 7, done.stderr[-3000:]
    assert "a worker could not serve" in done.stdout
    assert done.stderr.count("cannot serve:") <= 2  # each worker once, none restarted


#: Put on the server's PYTHONPATH, it makes every worker crash as it starts, before trainfer's code (or
#: uvicorn's) runs: spawned by multiprocessing, a worker runs ``python -c "from multiprocessing.spawn
#: import spawn_main; ..."``. Each crash leaves a file in $CRASHED, to count the starts.
CRASH_AT_START = """
import os, sys

if "spawn_main" in " ".join(sys.orig_argv):
    open(os.path.join(os.environ["CRASHED"], str(os.getpid())), "w").close()
    os._exit(70)
"""


def test_workers_that_crash_at_start_stop_the_server_after_a_few_tries(bundle, tmp_path):
    hook, crashed = tmp_path / "hook", tmp_path / "crashed"
    hook.mkdir()
    crashed.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_AT_START)
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
        "CRASHED": str(crashed),
    }
    command = [sys.executable, "-m", "trainfer", "serve", str(bundle), "--workers", "2", "--port", str(free_port())]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        _, stderr = server.communicate(timeout=180)  # restarted without end, it would never return
    finally:
        server.kill()
    assert server.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: a worker failed to start 3 times in a row"), stderr[-3000:]
    assert "exited with status 70" in last
    assert 3 <= len(list(crashed.iterdir())) <= 2 * 3  # each of the 2 workers tried at most 3 times
