"""The issue's targets for ``trainfer serve`` under load, and whether a run of ``bench_serve_load.py`` met them.

The targets: at concurrency 32, dynamic batching gives at least 2x the requests/s of ``--max-batch
1``, with a p99 under 3x the single-request latency (the dynamic server's p50 at concurrency 1)
plus the batching delay (5 ms); at concurrency 1 the server spends under 15 % of a request outside
the model's forward. Two floors (``floor_peer.py``: uvicorn and a raw ASGI app, no framework) tell
whether that last target is reachable at all: a server that cost only the bare floor (no model) would
spend ``floor latency / (floor latency + forward)`` outside the forward, and the floor running the
model (``--bundle``: the same app running the model's forward on each request, timed as ``trainfer
serve`` times its batch) is measured by the same overhead formula as ``trainfer serve``.

Pure arithmetic on the benchmark's rows: dicts with ``model``, ``server``, ``concurrency``,
``rps``, ``p50_ms``, ``p99_ms`` and, for ``trainfer serve`` at concurrency 1 with one worker and
the floor running the model, ``overhead`` and ``forward_ms`` (mean seconds per batch in the model,
from /metrics). A figure the rows lack (no such row, or none answered) is "not measured", never a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The servers the targets compare (the benchmark's row labels).
DYNAMIC = "trainfer serve, dynamic batching (32, 5 ms)"
BATCH_1 = "trainfer serve --max-batch 1"
COMPILED = "trainfer serve --compile, dynamic batching (32, 5 ms)"
FLOOR = "floor: raw ASGI app on uvicorn (1 process)"
FLOOR_MODEL = "floor running the model: raw ASGI app + forward (1 process)"

MAX_DELAY_MS = 5.0  # the dynamic server's --max-delay-ms
MIN_BATCHING_GAIN = 2.0
P99_FACTOR = 3.0
MAX_OVERHEAD = 0.15
HIGH = 32  # the concurrency the batching targets are judged at
FLOOR_WHAT = "(not a target) overhead at the floor"
FLOOR_MODEL_WHAT = "(not a target) overhead of the floor running the model"
FLOOR_OUTCOMES = ("reachable", "out of reach even at the floor")


def p99_target_ms(p50_c1_ms: float, delay_ms: float = MAX_DELAY_MS) -> float:
    """The p99 bound at concurrency 32: 3x the single-request latency plus the batching delay."""
    return P99_FACTOR * p50_c1_ms + delay_ms


def floor_overhead(floor_latency_ms: float, forward_ms: float) -> float:
    """The share of a request outside the forward for a server that costs only the floor."""
    return floor_latency_ms / (floor_latency_ms + forward_ms)


def find(rows: list[dict], model: str, server: str, concurrency: int) -> dict | None:
    """The row of ``server`` serving ``model`` at ``concurrency`` that answered something, or None."""
    for row in rows:
        if (row["model"], row["server"], row["concurrency"]) == (model, server, concurrency) and row["rps"] > 0:
            return row
    return None


@dataclass(frozen=True)
class Verdict:
    """One target: what it bounds, the measured figure, the bound, and whether it held (None: not measured)."""

    what: str
    measured: str
    target: str
    met: bool | None
    #: The words for met and not met (the floor is no target of trainfer's: it says whether one is reachable).
    outcomes: tuple[str, str] = ("met", "NOT met")

    def __str__(self) -> str:
        outcome = {True: self.outcomes[0], False: self.outcomes[1], None: "not measured"}[self.met]
        return f"{self.what} {self.measured} (target {self.target}): {outcome}"


def verdicts(rows: list[dict], model: str) -> list[Verdict]:
    """Each target for ``model``, judged from ``rows``; the p99 and overhead targets also for the server
    that serves the fastest form ``--compile`` found at start (when the rows have it)."""
    found = [
        batching(rows, model),
        tail(rows, model),
        overhead(rows, model),
        floor(rows, model),
        overhead(rows, model, FLOOR_MODEL, FLOOR_MODEL_WHAT, FLOOR_OUTCOMES),
    ]
    if find(rows, model, COMPILED, 1) is not None:
        found += [
            tail(rows, model, COMPILED, "--compile p99"),
            overhead(rows, model, COMPILED, "--compile overhead at c=1"),
        ]
    return found


def batching(rows: list[dict], model: str) -> Verdict:
    dynamic, batch_1 = find(rows, model, DYNAMIC, HIGH), find(rows, model, BATCH_1, HIGH)
    target = f">= {MIN_BATCHING_GAIN:g}x"
    if dynamic is None or batch_1 is None:
        return Verdict(f"batching gain at c={HIGH}", "-", target, None)
    gain = dynamic["rps"] / batch_1["rps"]
    measured = f"{gain:.2f}x ({dynamic['rps']:.1f} / {batch_1['rps']:.1f} req/s)"
    return Verdict(f"batching gain at c={HIGH}", measured, target, gain >= MIN_BATCHING_GAIN)


def tail(rows: list[dict], model: str, server: str = DYNAMIC, what: str = "dynamic p99") -> Verdict:
    """``server``'s p99 at concurrency 32 against 3x its own p50 at concurrency 1 plus the delay."""
    single, loaded = find(rows, model, server, 1), find(rows, model, server, HIGH)
    what = f"{what} at c={HIGH}"
    if single is None or loaded is None:
        return Verdict(what, "-", f"< {P99_FACTOR:g} x p50 at c=1 + {MAX_DELAY_MS:g} ms", None)
    bound = p99_target_ms(single["p50_ms"])
    target = f"< {P99_FACTOR:g} x {single['p50_ms']:.2f} + {MAX_DELAY_MS:g} = {bound:.1f} ms"
    return Verdict(what, f"{loaded['p99_ms']:.1f} ms", target, loaded["p99_ms"] < bound)


def overhead(
    rows: list[dict],
    model: str,
    server: str = DYNAMIC,
    what: str = "dynamic overhead at c=1",
    outcomes: tuple[str, str] = Verdict.outcomes,
) -> Verdict:
    """The share of a request at concurrency 1 outside the model's forward, of ``server`` (the dynamic
    ``trainfer serve``, or the floor running the model: whether the target is reachable at all)."""
    single = find(rows, model, server, 1)
    target = f"< {MAX_OVERHEAD:.0%}"
    if single is None or "overhead" not in single:
        return Verdict(what, "-", target, None, outcomes)
    measured = f"{single['overhead']:.1%} ({single['forward_ms']:.2f} ms forward)"
    return Verdict(what, measured, target, single["overhead"] < MAX_OVERHEAD, outcomes)


def floor(rows: list[dict], model: str) -> Verdict:
    """The overhead a server costing only the floor would have around this model's forward: not a
    target of trainfer's but whether the overhead target is reachable at all on this stack."""
    single, bare = find(rows, model, DYNAMIC, 1), find(rows, model, FLOOR, 1)
    target = f"< {MAX_OVERHEAD:.0%}"
    if bare is None:
        return Verdict(FLOOR_WHAT, "-", target, None)
    latency = 1e3 / bare["rps"]  # mean latency at concurrency 1, as the overhead uses
    if single is None or "forward_ms" not in single:
        return Verdict(FLOOR_WHAT, f"- ({latency:.2f} ms floor, forward not measured)", target, None)
    share = floor_overhead(latency, single["forward_ms"])
    measured = f"{share:.1%} ({latency:.2f} ms floor + {single['forward_ms']:.2f} ms forward)"
    return Verdict(FLOOR_WHAT, measured, target, share < MAX_OVERHEAD, FLOOR_OUTCOMES)
