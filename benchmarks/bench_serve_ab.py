"""``trainfer serve`` from two checkouts, side by side: interleaved rounds under wrk, medians per concurrency.

``bench_serve_load.py --compare-with DIR`` measures each server once; on a shared machine one run
can favour either side, so this runs ``--rounds`` rounds, each serving digits_net from both
checkouts in turn (alternating which goes first) at each concurrency, and prints each round's rows
and the medians: requests/s, p50 and p99 latency, the server's CPU per request and the mean batch
size (from ``/metrics``). Same servers, requests and wrk as ``bench_serve_load.py`` (one process,
``--threads`` torch threads, ``--max-batch 32 --max-delay-ms 5`` unless ``--server-args`` says otherwise)::

    .venv/bin/python benchmarks/bench_serve_ab.py --compare-with CHECKOUT [--rounds 4] [--duration 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bench_serve_load as load  # noqa: E402
from server_process import running_server  # noqa: E402

FIGURES = ("rps", "p50_ms", "p99_ms", "cpu_ms", "batch")


def measure(checkout: Path, bundle: Path, body: tuple[Path, int], lua: Path, args: argparse.Namespace) -> list[dict]:
    """One server from ``checkout`` at each concurrency: a row of :data:`FIGURES` per concurrency."""
    rows = []
    program = load.compared_program(checkout)
    with running_server(str(bundle), "--names", "digits_net", *args.server_args.split(), program=program) as server:
        url = f"{server.url}/v2/models/digits_net/infer"
        load.wrk(url, 8, 1, body, lua)  # warm-up
        for connections in args.concurrency:
            cpu, (_, batches) = load.cpu_seconds(server), load.inference_seconds(server)
            row = load.wrk(url, connections, args.duration, body, lua)
            answered = max(row["ok"], 1)
            row["cpu_ms"] = 1e3 * (load.cpu_seconds(server) - cpu) / answered
            row["batch"] = answered / max(load.inference_seconds(server)[1] - batches, 1)
            rows.append({"concurrency": connections, **{k: row[k] for k in FIGURES}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-with", type=Path, required=True, metavar="DIR", help="the other checkout's root")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency")
    parser.add_argument("--concurrency", type=lambda text: [int(c) for c in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--server-args", default="--max-batch 32 --max-delay-ms 5", help="trainfer serve's options")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    checkouts = {"this": HERE.parent, args.compare_with.name or "other": args.compare_with}
    with tempfile.TemporaryDirectory(prefix="serve-ab-") as folder:
        root = Path(folder)
        bundle = load.make_bundles(root, ["digits_net"])["digits_net"]
        body, lua = load.request_file(root, load.SHAPES["digits_net"]), root / "post.lua"
        lua.write_text(load.LUA)
        results: dict[str, list[list[dict]]] = {name: [] for name in checkouts}
        for round_ in range(args.rounds):
            for name in list(checkouts)[:: 1 if round_ % 2 == 0 else -1]:
                rows = measure(checkouts[name], bundle, body, lua, args)
                results[name].append(rows)
                for row in rows:
                    cells = " ".join(f"{k}={row[k]:.3f}" for k in FIGURES)
                    print(f"round {round_} {name:>8} c={row['concurrency']:<3} {cells} load={os.getloadavg()[0]:.1f}")
    print(f"\nmedians of {args.rounds} rounds: this checkout (the other)")
    print("| concurrency | " + " | ".join(FIGURES) + " |")
    print("|---" * (len(FIGURES) + 1) + "|")
    for i, connections in enumerate(args.concurrency):
        medians = {n: {k: statistics.median(r[i][k] for r in results[n]) for k in FIGURES} for n in checkouts}
        this, other = (medians[n] for n in checkouts)
        print(f"| {connections} | " + " | ".join(f"{this[k]:.3f} ({other[k]:.3f})" for k in FIGURES) + " |")


if __name__ == "__main__":
    main()
