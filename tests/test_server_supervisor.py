"""A worker process never outlives its parent (:func:`trainfer.server.supervisor.exit_with_parent`):
through the kernel's parent-death signal on Linux, or the polling fallback used elsewhere; with the
parent killed (SIGKILL) after the worker called it, or already gone when it did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import kill_running, still_running
from time_limit import time_limit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from Linux's /proc")

#: Seconds the worker may take to end after its parent died.
LIMIT = 30

#: A parent that starts one multiprocessing worker, prints its pid and sleeps. The worker calls
#: exit_with_parent (with the kernel's signal or, argv[2] == "polling", the fallback), after its
#: parent died (argv[1] == "late") or before, then sleeps.
PARENT = """
import multiprocessing, os, sys, time

def worker(late, polling):
    from trainfer.server import supervisor
    if polling:
        supervisor._signal_on_parent_death = lambda number: False
    if late:
        parent = multiprocessing.parent_process().pid
        while os.getppid() == parent:
            time.sleep(0.05)
    supervisor.exit_with_parent()
    print("armed", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    late, polling = sys.argv[1] == "late", sys.argv[2] == "polling"
    child = multiprocessing.get_context("spawn").Process(target=worker, args=(late, polling))
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("way", ["kernel", "polling"])
@pytest.mark.parametrize("when", ["early", "late"])
def test_a_worker_ends_when_its_parent_is_killed(tmp_path, when, way):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    parent = subprocess.Popen([sys.executable, str(script), when, way], stdout=subprocess.PIPE, text=True, env=env)
    workers: list[int] = []
    try:
        with time_limit(LIMIT):  # a worker that never says where it is fails the test
            workers.append(int(parent.stdout.readline()))
            if when == "early":
                assert parent.stdout.readline() == "armed\n"  # the worker's stdout is its parent's
        parent.kill()
        parent.wait(LIMIT)
        assert not still_running(workers, LIMIT)
    finally:
        parent.kill()
        parent.stdout.close()
        kill_running(workers)
