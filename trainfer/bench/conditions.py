"""Whether a timing run's figures can be trusted on this machine.

On a machine busier than its cores, a process timed with several intra-op threads waits for the CPU
between its own threads' work, and its latencies come out many times too slow, unevenly from form to
form (eager torch at 2 threads under load 3-6 measured 54-81 ms for 0.85 ms): ratios of medians then
mean nothing. :func:`measured` runs a timing and records the conditions it ran under;
:func:`untrusted` says, in one line, why such figures cannot be trusted (``None``: nothing seen).
It never corrects a figure: a starved measurement is reported, not rescaled.

The signs (any one suffices):

* the process got less than ``MIN_CPU_SHARE`` of one core while timing (``cpu_s < MIN_CPU_SHARE * wall_s``):
  a timing loop that runs kernels back to back keeps at least one core busy unless it is starved;
* the 1-minute load average exceeds the usable cores (``os.sched_getaffinity``);
* some form's 90th-percentile call took over ``MAX_SPREAD`` times its median.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from trainfer.bench.measure import Timing

__all__ = ["MAX_SPREAD", "MIN_CPU_SHARE", "Conditions", "measured", "untrusted"]

MIN_CPU_SHARE = 0.5
MAX_SPREAD = 3.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class Conditions:
    """What a timing ran under: its wall and process CPU seconds, the threads asked, load and usable cores."""

    wall_s: float
    cpu_s: float
    threads: int
    load: float
    cores: int


def _load() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measured(
    run: Callable[[], _T],
    threads: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
    load: Callable[[], float] = _load,
    cores: Callable[[], int] = _cores,
) -> tuple[_T, Conditions]:
    """``run()``'s result and the :class:`Conditions` it ran under (the sources injectable for tests)."""
    wall, cpu = clock(), cpu_clock()
    result = run()
    cpu_s, wall_s = cpu_clock() - cpu, clock() - wall
    return result, Conditions(wall_s, cpu_s, threads, max(load(), 0.0), cores())


def untrusted(conditions: Conditions, timings: Mapping[str, Timing]) -> str | None:
    """One line saying why figures measured under ``conditions`` cannot be trusted, or ``None``."""
    reasons = []
    if conditions.wall_s > 0 and conditions.cpu_s < MIN_CPU_SHARE * conditions.wall_s:
        share = conditions.cpu_s / conditions.wall_s
        reasons.append(f"the process got {share:.2f} CPU-s per s while timing ({conditions.threads} threads asked)")
    if conditions.load > conditions.cores:
        reasons.append(f"load average {conditions.load:.1f} above the {conditions.cores} usable cores")
    spreads = {name: t.p90_s / t.median_s for name, t in timings.items() if t.median_s > 0}
    worst = max(spreads, key=spreads.__getitem__, default=None)
    if worst is not None and spreads[worst] > MAX_SPREAD:
        reasons.append(f"{worst}'s 90th-percentile call took {spreads[worst]:.1f}x its median")
    if not reasons:
        return None
    # fewer threads are offered only to a run that used more: never advise what ran
    fewer = ", or with one thread: --threads 1, threads=1 in Python" if conditions.threads > 1 else ""
    return (
        "latencies measured on a starved or busy machine, so the ratios, and any choice made on them, may not hold: "
        + "; ".join(reasons)
        + f" (rerun on an idle machine{fewer})"
    )
