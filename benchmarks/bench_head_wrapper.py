"""CPU time ``trainfer.server.head``'s wrapped ``send`` adds to a request that is not ``HEAD``.

A minimal ASGI app (a 200 start and a two-byte body) is called directly and through ``AllowHead``, the
wrapper that adds ``HEAD`` to a 405's ``Allow`` (before the inference route skipped it, ``HeadAsGet``
wrapped every request's ``send`` the same way), alternating which goes first each round; the process
CPU time and the wall clock per call, at one thread. The table gives the medians over the rounds::

    python benchmarks/bench_head_wrapper.py --rounds 15
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from trainfer.server.head import AllowHead

SCOPE = {"type": "http", "method": "POST", "path": "/v2/models/digits/infer", "headers": []}


async def _app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _sink(message) -> None:
    pass


async def _per_call(app, calls: int) -> tuple[float, float]:
    """Nanoseconds of process CPU and of wall clock per call of ``app``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await app(SCOPE, _receive, _sink)
    return (time.process_time() - cpu) / calls * 1e9, (time.perf_counter() - wall) / calls * 1e9


async def _main(rounds: int, calls: int) -> None:
    forms = [("direct", _app), ("wrapped", AllowHead(_app))]
    costs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in forms}
    for round_ in range(rounds):
        for name, app in forms if round_ % 2 == 0 else forms[::-1]:
            costs[name].append(await _per_call(app, calls))
    print(f"ns per call, medians of {rounds} rounds of {calls} calls (min-max)")
    medians = {}
    for name, values in costs.items():
        cpu, wall = ([v[i] for v in values] for i in (0, 1))
        medians[name] = statistics.median(cpu), statistics.median(wall)
        print(
            f"{name:>8}: CPU {medians[name][0]:.0f} ({min(cpu):.0f}-{max(cpu):.0f}), "
            f"wall {medians[name][1]:.0f} ({min(wall):.0f}-{max(wall):.0f})"
        )
    extra = [medians["wrapped"][i] - medians["direct"][i] for i in (0, 1)]
    print(f"the wrapper: CPU {extra[0]:.0f} ns, wall {extra[1]:.0f} ns per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(_main(args.rounds, args.calls))


if __name__ == "__main__":
    main()
