"""CPU time a request costs ``trainfer serve``'s app, in process (no sockets, no uvicorn), against another checkout.

Each round starts one process per checkout, alternating which goes first; each process builds the app
serving ``tests/fixtures/digits_deploy_v2`` at one torch thread, answers ``--warmup`` then ``--requests``
requests of each kind one after another (a one-sample JSON ``/infer``, ``GET /v2/health/live``), each
with ``Host: 127.0.0.1:8000``, and reports the process CPU time per request. The model's batch is
replaced by its outputs computed once (the server's path is measured, not the forward, whose
0.3-0.5 ms would drown it). The table gives the median over the rounds::

    python benchmarks/bench_request_path.py --compare-with /tmp/base --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
BUNDLE = HERE / "tests" / "fixtures" / "digits_deploy_v2"
INFER = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})
KINDS = {"infer": ("POST", "/v2/models/digits/infer", INFER.encode()), "live": ("GET", "/v2/health/live", b"")}


async def _request(app, method: str, path: str, body: bytes) -> int:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent[0]["status"]


async def _measure(warmup: int, requests: int) -> dict[str, float]:
    """Microseconds of process CPU per request of each kind, in this process's checkout."""
    import torch

    from trainfer.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(bundles={"digits": str(BUNDLE)}))
    async with app.router.lifespan_context(app):
        while await _request(app, "GET", "/v2/health/ready", b"") != 200:
            await asyncio.sleep(0.05)
        server = app.state.server
        outputs = server.models["digits"].compute(server.models["digits"].prepare(torch.full((1, 1, 8, 8), 0.5)))
        server.batchers["digits"].run = lambda batch, *key: outputs
        costs = {}
        for kind, (method, path, body) in KINDS.items():
            for _ in range(warmup):
                assert await _request(app, method, path, body) == 200
            start = time.process_time()
            for _ in range(requests):
                await _request(app, method, path, body)
            costs[kind] = (time.process_time() - start) / requests * 1e6
    return costs


def _run(checkout: Path, warmup: int, requests: int) -> dict[str, float]:
    environment = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--measure", str(warmup), str(requests)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-with", type=Path, help="another checkout's root (e.g. a `git archive` of a commit)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(asyncio.run(_measure(*args.measure))))
        return
    checkouts = {"this checkout": HERE, **({"compared": args.compare_with} if args.compare_with else {})}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for round_ in range(args.rounds):
        order = list(checkouts) if round_ % 2 == 0 else list(reversed(checkouts))
        for name in order:
            results[name].append(_run(checkouts[name], args.warmup, args.requests))
    print(f"process CPU us per request, median of {args.rounds} rounds ({args.requests} requests each)")
    for name, runs in results.items():
        cells = ", ".join(f"{kind} {statistics.median(r[kind] for r in runs):.1f}" for kind in KINDS)
        print(f"{name:>14}: {cells}   (all: {[round(r['infer'], 1) for r in runs]} infer)")


if __name__ == "__main__":
    main()
