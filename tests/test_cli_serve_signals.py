"""How ``trainfer serve`` ends on a signal, in a real server process: Ctrl-C (SIGINT) after the graceful
shutdown exits quietly with the shell's 130 (not click's ``Aborted!`` and 1, which docs/security.md's
exit codes give to a negative verdict); SIGTERM keeps uvicorn's status (the signal re-raised, or 0)."""

from __future__ import annotations

import signal

import pytest
from server_process import running_server
from serving_models import save_bundle

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow  # a server subprocess: torch imported cold, the model loaded

#: Seconds a served tiny model may take to shut down gracefully before the test fails.
SHUTDOWN_LIMIT = 60


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return save_bundle(tmp_path_factory.mktemp("signals") / "tiny", seed=0, labels=["a", "b", "c"])


@pytest.mark.parametrize(
    ("sent", "statuses"),
    [(signal.SIGINT, {130}), (signal.SIGTERM, {0, -signal.SIGTERM})],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_ends_the_server_gracefully_with_its_status_and_no_abort_message(bundle, sent, statuses):
    with running_server(str(bundle)) as server:
        server.process.send_signal(sent)
        status = server.process.wait(SHUTDOWN_LIMIT)  # TimeoutExpired fails the test; the block then kills it
        logs = server.logs()
    assert status in statuses, logs[-3000:]
    assert "Finished server process" in logs, logs[-3000:]  # uvicorn's graceful shutdown ran to its end
    assert "Aborted!" not in logs and "Traceback" not in logs, logs[-3000:]
