"""``trainfer ARGS`` with the runtime search's measurement hooked, for tests of ``trainfer serve --compile``.

Run as ``python search_hook.py serve BUNDLE --compile ...`` (``running_server(program=...)``). Environment:

* ``TRAINFER_TEST_SEARCH_GATE``: the measurement waits until this file exists (at most a minute), with
  the file ``<gate>.held`` present while it waits: the test's way to hold the search in progress;
* ``TRAINFER_TEST_SEARCH_FAST``: every candidate but this one (``runtime/dtype``) sleeps per call while
  measured (:func:`test_runtime_gated._only_fast`), so the choice is known whatever this CPU prefers; the
  timing is then taken as trusted (the sleeps starve the process on purpose, and a shared test machine is
  busy), since a reduced precision is never chosen on a timing flagged as untrusted.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainfer.bench import conditions
from trainfer.cli import main
from trainfer.serve import runtime

#: What a slowed candidate sleeps per call (test_runtime_gated.SLOW_S).
SLOW_S = 0.02


def hooked_measure(measure, gate: Path | None, fast: str | None):
    """``measure`` (:func:`trainfer.serve.runtime._measure`) held by ``gate`` and with all but ``fast`` slowed."""

    def slow(engine):
        return lambda batch: (time.sleep(SLOW_S), engine(batch))[1]

    def hooked(engines, records, source, options):
        if gate is not None:
            held = gate.with_suffix(".held")
            held.touch()
            deadline = time.monotonic() + 60
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            held.unlink()
        if fast is None:
            measure(engines, records, source, options)
            return
        engines = {name: e if name == fast else slow(e) for name, e in engines.items()}
        flagging = conditions.untrusted
        conditions.untrusted = lambda *_: None
        try:
            measure(engines, records, source, options)
        finally:
            conditions.untrusted = flagging

    return hooked


if __name__ == "__main__":
    gate = os.environ.get("TRAINFER_TEST_SEARCH_GATE")
    runtime._measure = hooked_measure(  # type: ignore[assignment]
        runtime._measure, Path(gate) if gate else None, os.environ.get("TRAINFER_TEST_SEARCH_FAST")
    )
    main(sys.argv[1:], prog_name="trainfer")
