"""``trainfer serve`` under load: dynamic batching against batch-1 serving and a plain FastAPI handler.

For each model (deploy forms of ``digits_net`` on 1x8x8 and ``repvgg_a0`` on 3x224x224, random
weights with non-trivial BatchNorm statistics) four servers run in turn, each in its own process:
``trainfer serve`` with dynamic batching (``--max-batch 32 --max-delay-ms 5``), ``trainfer serve
--max-batch 1``, ``benchmarks/serve_peer.py`` (the same Predictor behind a per-request FastAPI
handler) and ``benchmarks/litserve_peer.py`` (the same Predictor behind LitServe with its batching,
32 and 5 ms; skipped when litserve is not installed). wrk (Debian's ``wrk``; a separate process)
drives each at concurrency 1, 8 and 32 with one-sample requests -- Open Inference Protocol binary
tensor data, or for LitServe (which takes JSON only) the same bytes base64-encoded in JSON -- and
reports throughput and p50/p99 latency. Every server runs its model on ``--threads`` torch threads
(1 by default, the same for all). At concurrency 1 the server's overhead is ``1 - (mean seconds
per batch in the model, from /metrics) / (mean request latency)``. ``cpu_ms`` is the server
process's own CPU time (user + system, every thread and child process, from ``/proc``) per answered request
over the run: it moves far less with the machine's load than req/s (caches and clock still shift it),
so it is the figure to compare code by on a shared machine (``--compare-with DIR``: a checkout of
other code, each of its rows right after the same row of this code); it means little for a run in
which few requests finished (requests still in flight when wrk stops cost CPU but are not counted).

The overload test drives the dynamic server (``--max-queue 64``) with 10x the connections of the
concurrency-32 run (320, closed loop: wrk cannot hold a rate) for ``--overload-seconds``, waits
for what the overload left queued to drain (``queue_drained_s``), then runs at concurrency 8:
every answer must be 200 or 503 (with Retry-After), the process must live, its memory stay
bounded, and the nominal phase answer only 200s.

    .venv/bin/python benchmarks/bench_serve_load.py [--models digits_net,repvgg_a0] [--duration 10]
        [--overload-seconds 30] [--threads 1] [--out runs/serve_load.json]
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


def servers(bundle: Path, name: str, compare: Path | None = None) -> dict[str, tuple[list[str], list[str] | None]]:
    """Label -> (arguments, program: None for ``trainfer serve``) of each server to measure; with
    ``compare`` (a checkout), each ``trainfer serve`` is followed by the same served by that code."""
    peers = ROOT / "benchmarks"
    found = {
        "trainfer serve, dynamic batching (32, 5 ms)": (
            [str(bundle), "--names", name, "--max-batch", "32", "--max-delay-ms", "5"],
            None,
        ),
        "trainfer serve --max-batch 1": (
            [str(bundle), "--names", name, "--max-batch", "1", "--max-delay-ms", "0"],
            None,
        ),
        "plain FastAPI per-request handler": (
            [str(bundle), "--name", name],
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
            [str(bundle), "--name", name, "--max-batch", "32", "--max-delay-ms", "5"],
            [sys.executable, str(peers / "litserve_peer.py")],
        )
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
    compare: Path | None = None,
) -> list[dict]:
    """Every server of :func:`servers` at each concurrency; ``bodies``: "binary" and "litserve" requests."""
    rows = []
    for label, (args, program) in servers(bundle, name, compare).items():
        trainfer_serve = program is None or label.endswith("]")
        body = bodies["litserve" if label == LITSERVE else "binary"]
        with running_server(*args, program=program) as server:
            url = f"{server.url}/v2/models/{name}/infer"
            wrk(url, 8, 2, body, lua)  # warm-up
            for connections in CONCURRENCY:
                before = inference_seconds(server) if trainfer_serve else (0.0, 0.0)
                cpu = cpu_seconds(server)
                row = {
                    "model": name,
                    "server": label,
                    "concurrency": connections,
                    **wrk(url, connections, seconds, body, lua),
                }
                row["cpu_ms"] = 1e3 * (cpu_seconds(server) - cpu) / max(row["ok"], 1)
                if trainfer_serve and connections == 1:
                    after = inference_seconds(server)
                    per_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    row["overhead"] = 1 - per_batch * row["rps"]  # rps = 1 / mean latency at concurrency 1
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
        help="torch threads of every server (OMP_NUM_THREADS; 0: torch's default). On a shared machine more "
        "than 1 makes each forward wait for descheduled sibling threads, batches most",
    )
    args = parser.parse_args()
    if args.threads > 0:  # inherited by every server process, peers included
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if shutil.which("wrk") is None:
        parser.error("needs wrk (apt-get install wrk)")
    names = args.models.split(",")
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
            rows += measure_model(name, bundles[name], bodies, lua, args.duration, args.compare_with)
        if args.overload_seconds > 0:
            for name in names:
                result = overload(name, bundles[name], request_file(root, SHAPES[name]), lua, args.overload_seconds)
                overloads.append(result)
                print(json.dumps(result), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run = {"rows": rows, "overload": overloads, "threads": args.threads, "time": time.ctime()}
        args.out.write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
