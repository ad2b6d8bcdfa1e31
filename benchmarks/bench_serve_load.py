"""``trainfer serve`` under load: dynamic batching against batch 1, plain FastAPI, LitServe and the floor.

For each model (deploy forms of ``digits_net`` on 1x8x8 and ``repvgg_a0`` on 3x224x224, random
weights with non-trivial BatchNorm statistics) seven servers run in turn, each in its own
process(es): ``trainfer serve`` with dynamic batching (``--max-batch 32 --max-delay-ms 5``),
``trainfer serve --max-batch 1``, the dynamic server with ``--compile`` (serving the fastest
verified float32 form ``trainfer compile``'s search finds at start, e.g. ONNX Runtime),
``benchmarks/serve_peer.py`` (the same Predictor behind a per-request FastAPI handler),
``benchmarks/litserve_peer.py`` (the same Predictor behind LitServe with its batching, 32 and 5 ms;
skipped when litserve is not installed) and the floor, ``benchmarks/floor_peer.py`` (uvicorn with
uvloop and httptools, the stack ``trainfer serve`` runs on, serving a raw ASGI app that reads the
body and answers a fixed, precomputed response of the right shape: no framework, no model, no
decoding; always one process, so its concurrency-8 and -32 rows are the throughput ceiling of one
Python process on this stack), and the floor running the model (``floor_peer.py --bundle``: the same
app also runs the model's forward on each request's sample, one process, no batching). wrk (Debian's
``wrk``; a separate process) drives each at concurrency 1, 8 and 32 with one-sample requests -- Open
Inference Protocol binary tensor data, or for LitServe (which takes JSON only) the same bytes
base64-encoded in JSON -- and reports throughput and p50/p99 latency. Every server runs its model on
``--threads`` torch threads (1 by default, the same for all).

``--workers N`` (1 by default) runs every server but the floor as N processes sharing the port:
``trainfer serve --workers N``, the FastAPI peer as N uvicorn workers, LitServe with N inference
workers and N HTTP front-end processes (``workers_per_device=N``, ``num_api_servers=N``).

At concurrency 1 the server's overhead is ``1 - (mean seconds per batch in the model, from
/metrics: timed on the thread that runs the batch, the hand-off to it excluded) / (mean request
latency)``, measured with ``--workers 1`` only: with more, /metrics
answers from whichever process takes its connection, not necessarily the one that served wrk's, so
the figure is left out rather than guessed. From the same run, the overhead a server costing only
the floor would have: ``floor latency / (floor latency + forward)`` (mean latencies at
concurrency 1), and the overhead of the floor running the model, measured by the same formula (its
forward timed on its event loop, served at its /metrics) -- whether 15 % is reachable at all for a
model whose forward is sub-millisecond.

``cpu_ms`` is the server process's own CPU time (user + system, every thread and child process,
from ``/proc``) per answered request over the run: it moves far less with the machine's load than
req/s (caches and clock still shift it), so it is the figure to compare code by on a shared machine
(``--compare-with DIR``: a checkout of other code, each of its rows right after the same row of
this code); it means little for a run in which few requests finished (requests still in flight
when wrk stops cost CPU but are not counted).

The overload test drives the dynamic server (``--max-queue 64``) with 10x the connections of the
concurrency-32 run (320, closed loop: wrk cannot hold a rate) for ``--overload-seconds``, waits
for what the overload left queued to drain (``queue_drained_s``), then runs at concurrency 8:
every answer must be 200 or 503 (with Retry-After), the process must live, its memory stay
bounded, and the nominal phase answer only 200s (one process, whatever ``--workers``).

After the tables, one line per model states each of the issue's targets and whether this run met
it, computed from the rows (``serve_targets.py``): dynamic batching >= 2x the req/s of
``--max-batch 1`` at concurrency 32, its p99 there under 3x its p50 at concurrency 1 + 5 ms, its
overhead at concurrency 1 under 15 %, and the same overhead for a server at the floor. ``--plot
PATH`` draws, per model, req/s and p99 against concurrency for every server (log scales) with the
p99 target as a line.

    .venv/bin/python benchmarks/bench_serve_load.py [--models digits_net,repvgg_a0] [--duration 10]
        [--overload-seconds 30] [--threads 1] [--workers 1] [--plot serve_load.png] [--out runs/serve_load.json]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # server_process: start and always stop a server
sys.path.insert(0, str(ROOT / "benchmarks"))  # serve_targets (also when run by runpy, which adds nothing)

import serve_targets  # noqa: E402
from serve_targets import BATCH_1, COMPILED, DYNAMIC, FLOOR, FLOOR_MODEL  # noqa: E402
from server_process import ServerProcess, get, running_server  # noqa: E402

import trainfer  # noqa: E402
from trainfer import models  # noqa: E402
from trainfer.numerics import randomize_batchnorm  # noqa: E402

SHAPES = {"digits_net": (1, 8, 8), "repvgg_a0": (3, 224, 224)}
CONCURRENCY = (1, 8, 32)
LITSERVE = "LitServe, its batching (32, 5 ms)"
LUA = """
local f = io.open(os.getenv("TRAINFER_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"
if os.getenv("TRAINFER_HEADER") == "json" then
  wrk.headers["Content-Type"] = "application/json"
else
  wrk.headers["Content-Type"] = "application/octet-stream"
  wrk.headers["Inference-Header-Content-Length"] = os.getenv("TRAINFER_HEADER")
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; busy = 0; other = 0; retry = 0 end
function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 503 then
    busy = busy + 1
    if headers["retry-after"] or headers["Retry-After"] then retry = retry + 1 end
  else other = other + 1 end
end
function done(summary, latency, requests)
  local t = {ok = 0, busy = 0, other = 0, retry = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  io.write(string.format("STATUS ok=%d busy=%d other=%d retry=%d\\n", t.ok, t.busy, t.other, t.retry))
end
"""


def make_bundles(root: Path, names: list[str]) -> dict[str, Path]:
    """Deploy-form bundles of ``names`` (random weights, non-trivial BatchNorm statistics)."""
    bundles = {}
    for name in names:
        torch.manual_seed(0)
        model = randomize_batchnorm(getattr(models, name)(), seed=0).eval()
        example = torch.randn(1, *SHAPES[name])
        deployed = trainfer.deploy(model, example)
        spec = trainfer.PreprocessSpec(input_shape=SHAPES[name])
        bundles[name] = trainfer.save(deployed, root / name, preprocess=spec)
    return bundles


def request_file(root: Path, shape: tuple[int, ...]) -> tuple[Path, int]:
    """One-sample request with binary tensor data; returns (path, JSON header length)."""
    blob = _sample(shape).tobytes()
    header = {
        "inputs": [
            {"name": "input", "shape": [1, *shape], "datatype": "FP32", "parameters": {"binary_data_size": len(blob)}}
        ],
        "outputs": [{"name": "label"}],
    }
    text = json.dumps(header).encode()
    path = root / f"request_{'x'.join(map(str, shape))}.bin"
    path.write_bytes(text + blob)
    return path, len(text)


def litserve_request_file(root: Path, shape: tuple[int, ...]) -> tuple[Path, str]:
    """The same sample as the LitServe peer takes it: its float32 bytes base64-encoded in JSON."""
    body = {"shape": [1, *shape], "b64": base64.b64encode(_sample(shape).tobytes()).decode()}
    path = root / f"request_{'x'.join(map(str, shape))}.json"
    path.write_text(json.dumps(body))
    return path, "json"


def _sample(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).random((1, *shape), dtype=np.float32)


def wrk(url: str, connections: int, seconds: float, body: tuple[Path, int | str], lua: Path) -> dict:
    """Run wrk; throughput, p50/p99 latency (ms) and status counts."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "60s"]
    env = {"TRAINFER_BODY": str(body[0]), "TRAINFER_HEADER": str(body[1]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*command, "-s", str(lua), url], capture_output=True, text=True, env=env, timeout=seconds + 120
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr}")
    out = done.stdout
    status = dict(re.findall(r"(\w+)=(\d+)", re.search(r"STATUS (.*)", out).group(1)))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1)),
        "p99_ms": _ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1)),
        **{k: int(v) for k, v in status.items()},
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def inference_seconds(server: ServerProcess) -> tuple[float, float]:
    """(sum, count) of the server's seconds per batch in the model, from /metrics."""
    text = get(server.url + "/metrics")[1].decode()
    total = sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("trainfer_inference_seconds_sum")
    )
    count = sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("trainfer_inference_seconds_count")
    )
    return total, count


def queue_depth(server: ServerProcess) -> float:
    """Samples waiting in the server's batchers, from /metrics."""
    text = get(server.url + "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("trainfer_queue_samples{"))


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU seconds so far of the server process and its live descendants (every thread;
    LitServe computes in child processes)."""
    total, pids = 0.0, [server.process.pid]
    while pids:
        pid = pids.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # a child that exited meanwhile
            continue
    return total


def rss_mb(server: ServerProcess) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def servers(
    bundle: Path, name: str, workers: int = 1, compare: Path | None = None
) -> dict[str, tuple[list[str], list[str] | None]]:
    """Label -> (arguments, program: None for ``trainfer serve``) of each server to measure, each but the
    floor with ``workers`` processes; with ``compare`` (a checkout), each ``trainfer serve`` is followed
    by the same served by that code."""
    peers = ROOT / "benchmarks"
    processes = ["--workers", str(workers)]
    dynamic = [str(bundle), "--names", name, "--max-batch", "32", "--max-delay-ms", "5", *processes]
    found = {
        DYNAMIC: (dynamic, None),
        BATCH_1: ([str(bundle), "--names", name, "--max-batch", "1", "--max-delay-ms", "0", *processes], None),
        COMPILED: ([*dynamic, "--compile"], None),
        "plain FastAPI per-request handler": (
            [str(bundle), "--name", name, *processes],
            [sys.executable, str(peers / "serve_peer.py")],
        ),
    }
    if compare is not None:
        found = dict(
            entry
            for label, (args, program) in found.items()
            for entry in [(label, (args, program))]
            + ([(f"{label} [{compare.name}]", (args, compared_program(compare)))] if program is None else [])
        )
    if importlib.util.find_spec("litserve") is not None:
        found[LITSERVE] = (
            [str(bundle), "--name", name, "--max-batch", "32", "--max-delay-ms", "5", *processes],
            [sys.executable, str(peers / "litserve_peer.py")],
        )
    found[FLOOR] = (["--name", name], [sys.executable, str(peers / "floor_peer.py")])
    found[FLOOR_MODEL] = (["--name", name, "--bundle", str(bundle)], [sys.executable, str(peers / "floor_peer.py")])
    return found


def compared_program(checkout: Path) -> list[str]:
    """``trainfer serve`` as the code in ``checkout`` runs it (its ``trainfer`` package first on the path)."""
    run = "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('trainfer', run_name='__main__')"
    return [sys.executable, "-c", run, str(checkout.resolve()), "serve"]


def measure_model(
    name: str,
    bundle: Path,
    bodies: dict[str, tuple[Path, int | str]],
    lua: Path,
    seconds: float,
    workers: int = 1,
    compare: Path | None = None,
) -> list[dict]:
    """Every server of :func:`servers` at each concurrency; ``bodies``: "binary" and "litserve" requests.
    The overhead at concurrency 1 (and the forward's mean seconds, ``forward_ms``) only with one worker."""
    rows = []
    for label, (args, program) in servers(bundle, name, workers, compare).items():
        trainfer_serve = program is None or label.endswith("]")
        overhead_at_1 = (trainfer_serve and workers == 1) or label == FLOOR_MODEL  # the floors run one process
        body = bodies["litserve" if label == LITSERVE else "binary"]
        with running_server(*args, program=program) as server:
            url = f"{server.url}/v2/models/{name}/infer"
            wrk(url, 8, 2, body, lua)  # warm-up
            for connections in CONCURRENCY:
                before = inference_seconds(server) if overhead_at_1 else (0.0, 0.0)
                cpu = cpu_seconds(server)
                row = {
                    "model": name,
                    "server": label,
                    "concurrency": connections,
                    **wrk(url, connections, seconds, body, lua),
                }
                row["cpu_ms"] = 1e3 * (cpu_seconds(server) - cpu) / max(row["ok"], 1)
                if overhead_at_1 and connections == 1:
                    after = inference_seconds(server)
                    per_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    row["overhead"] = 1 - per_batch * row["rps"]  # rps = 1 / mean latency at concurrency 1
                    row["forward_ms"] = 1e3 * per_batch
                rows.append(row)
                print(_row_text(row), flush=True)
    return rows


#: The overload test's bound on waiting samples: below its 320 connections, so that a full queue is met.
OVERLOAD_QUEUE = 64


def overload(name: str, bundle: Path, body: tuple[Path, int], lua: Path, seconds: float) -> dict:
    args = [
        str(bundle),
        "--names",
        name,
        "--max-batch",
        "32",
        "--max-delay-ms",
        "5",
        "--max-queue",
        str(OVERLOAD_QUEUE),
    ]
    with running_server(*args) as server:
        url = f"{server.url}/v2/models/{name}/infer"
        wrk(url, 32, 3, body, lua)
        before = rss_mb(server)
        loaded = wrk(url, 320, seconds, body, lua)
        during = rss_mb(server)
        drained = time.monotonic()
        while queue_depth(server) > 0 and time.monotonic() - drained < 300:  # what wrk left queued
            time.sleep(0.5)
        drain_s = time.monotonic() - drained
        nominal = wrk(url, 8, 10, body, lua)
        alive = server.process.poll() is None
        return {
            "model": name,
            "rss_mb_before": before,
            "rss_mb_after_overload": during,
            "queue_drained_s": drain_s,
            "overload": loaded,
            "nominal_after": nominal,
            "alive": alive,
            "passed": alive and _only_ok_or_busy(loaded) and _only_ok_or_busy(nominal) and not nominal["busy"],
        }


def _only_ok_or_busy(counts: dict) -> bool:
    """Every answer 200 or 503-with-Retry-After, no socket error."""
    return counts["other"] == 0 and counts["socket_errors"] == 0 and counts["retry"] == counts["busy"]


def _row_text(row: dict) -> str:
    overhead = f", overhead {row['overhead']:.1%}" if "overhead" in row else ""
    return (
        f"| {row['model']} | {row['server']} | {row['concurrency']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
        f"{row['p99_ms']:.1f} | {row['cpu_ms']:.2f} | {row['ok']} ok, {row['busy']} 503, {row['other']} other"
        f"{overhead} |"
    )


def report_targets(rows: list[dict], names: list[str], workers: int) -> None:
    """One line per model: each target of :mod:`serve_targets`, its figure and whether this run met it."""
    print()
    for name in names:
        print(f"{name}: " + "; ".join(map(str, serve_targets.verdicts(rows, name))))
    if workers > 1:
        print(f"(--workers {workers}: the overheads at concurrency 1 are not measured, /metrics is per process)")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per model, req/s and p99 against concurrency for every server (log scales), and the p99 target
    (3x the dynamic server's p50 at concurrency 1 + 5 ms), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = pyplot.subplots(len(names), 2, figsize=(13, 4.8 * len(names)), squeeze=False)
    for (speed, tail), name in zip(axes, names):
        for server in dict.fromkeys(row["server"] for row in rows if row["model"] == name):
            own = [row for row in rows if (row["model"], row["server"]) == (name, server) and row["rps"] > 0]
            levels = [row["concurrency"] for row in own]
            style = {"marker": "o", "linestyle": "--" if server in (FLOOR, FLOOR_MODEL) else "-"}
            speed.plot(levels, [row["rps"] for row in own], label=server, **style)
            tail.plot(levels, [row["p99_ms"] for row in own], label=server, **style)
        single = serve_targets.find(rows, name, DYNAMIC, 1)
        if single is not None:
            bound = serve_targets.p99_target_ms(single["p50_ms"])
            tail.axhline(bound, color="red", linestyle=":", label=f"p99 target at c=32: {bound:.1f} ms")
        for axis, what in ((speed, "requests/s"), (tail, "p99 latency, ms")):
            axis.set(xscale="log", yscale="log", xlabel="concurrency (wrk connections)", ylabel=what)
            axis.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            axis.set_title(f"{name}: {what}")
            axis.grid(True, which="both", alpha=0.3)
        tail.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_net,repvgg_a0", help="comma-separated: digits_net, repvgg_a0")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per load level (0: the overload test only)"
    )
    parser.add_argument("--overload-seconds", type=float, default=30.0, help="0: no overload test")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="DIR",
        help="a checkout of other code (its trainfer/ package): each trainfer serve row is followed by the same "
        "server running that code",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every server (OMP_NUM_THREADS; 0: torch's default; default 1). On a shared machine more "
        "than 1 makes each forward wait for descheduled sibling threads, batches most",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes of every server but the floor, sharing its port (trainfer serve --workers N, uvicorn "
        "workers=N for the FastAPI peer, N inference workers and N HTTP servers for LitServe); the overhead at "
        "concurrency 1 is measured with 1 only (/metrics is per process)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="also draw req/s and p99 against concurrency, per model and server, with the p99 target (PNG)",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers: expected at least 1, got {args.workers}")
    if args.threads > 0:  # inherited by every server process, peers included
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if shutil.which("wrk") is None:
        parser.error("needs wrk (apt-get install wrk)")
    names = args.models.split(",")
    if importlib.util.find_spec("litserve") is None:
        print("LitServe is not installed (pip install -e '.[bench]'): its rows are left out", flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        root = Path(folder)
        bundles = make_bundles(root, names)
        lua = root / "post.lua"
        lua.write_text(LUA)
        print(
            "| model | server | concurrency | req/s | p50 ms | p99 ms | server CPU ms/request | answers |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        rows, overloads = [], []
        for name in names if args.duration > 0 else ():
            bodies = {"binary": request_file(root, SHAPES[name]), "litserve": litserve_request_file(root, SHAPES[name])}
            rows += measure_model(name, bundles[name], bodies, lua, args.duration, args.workers, args.compare_with)
        if rows:
            report_targets(rows, names, args.workers)
        if args.overload_seconds > 0:
            for name in names:
                result = overload(name, bundles[name], request_file(root, SHAPES[name]), lua, args.overload_seconds)
                overloads.append(result)
                print(json.dumps(result), flush=True)
    if args.plot is not None and rows:
        title = f"bench_serve_load: --threads {args.threads} --workers {args.workers}, {time.ctime()}"
        plot(rows, args.plot, title)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figures = {"rows": rows, "overload": overloads, "threads": args.threads, "workers": args.workers}
        args.out.write_text(json.dumps({**figures, "time": time.ctime()}, indent=1))


if __name__ == "__main__":
    main()
