"""Batch prediction throughput and memory: ``trainfer predict BUNDLE DIR --out preds.jsonl`` on 8x8 PNGs.

Runs the real command in fresh processes — one process, then ``torchrun --nproc_per_node P`` — each
on a small and a large directory of generated PNGs (a digits_net bundle), and prints from one run:

* images/s end to end, and steady images/s: the records written after the first flush over the
  time to the last write (the output file is watched), which leaves out start-up (imports, process
  group, model load) and teardown;
* peak RSS: the largest process of the command's tree (``os.wait4``; torchrun waits for its ranks);
* ratios: P-process over 1-process steady throughput on the large directory, and large over small
  peak RSS (bounded memory: about 1.0 whatever the input count);
* whether the P-process output equals the 1-process output byte for byte.

    .venv/bin/python benchmarks/bench_batch_predict.py [--images 20000] [--small 2000] [--procs 2]
        [--batch-size 64] [--threads 1] [--plot runs/batch_predict.png]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import trainfer
from trainfer.atomic import atomic_file
from trainfer.models import digits_net
from trainfer.testing import randomize_batchnorm


@dataclass(frozen=True)
class Run:
    procs: int
    images: int
    seconds: float
    steady_rate: float
    peak_mib: float
    out: Path


def make_bundle(path: Path, width: int) -> Path:
    """A digits_net (1x8x8 inputs, 10 classes) with non-trivial BatchNorm statistics, as a bundle."""
    model = randomize_batchnorm(digits_net(width=width)).eval()
    return trainfer.save(model, path, task="classification")


def make_images(directory: Path, count: int, seed: int = 0) -> Path:
    """``count`` random 8x8 grayscale PNGs in ``directory``."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in tqdm(range(count), desc=f"writing {count} PNGs", unit="png"):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(directory / f"{index:06d}.png")
    return directory


def command(procs: int, bundle: Path, images: Path, out: Path, batch_size: int) -> list[str]:
    predict = [
        "-m",
        "trainfer",
        "predict",
        str(bundle),
        str(images),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
    ]
    if procs == 1:
        return [sys.executable, *predict]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *predict]


def run(procs: int, bundle: Path, images: Path, work: Path, batch_size: int, threads: int) -> Run:
    """Time one command in a fresh process tree, watching its output; peak RSS comes from ``wait4``."""
    count = sum(1 for _ in images.iterdir())
    out = work / f"preds-{procs}p-{count}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    first: tuple[float, int] | None = None  # (time, records) at the first flush seen
    with open(work / f"{out.stem}.log", "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command(procs, bundle, images, out, batch_size), env=env, stdout=log, stderr=log)
        while not (waited := os.wait4(process.pid, os.WNOHANG))[0]:
            if first is None and out.exists() and out.stat().st_size:
                first = (time.time(), len(out.read_bytes().splitlines()))
            time.sleep(0.002)
        seconds = time.perf_counter() - start
    _, status, usage = waited
    if os.waitstatus_to_exitcode(status) != 0 or first is None:
        sys.exit(f"{procs}-process run failed:\n{(work / f'{out.stem}.log').read_text()[-3000:]}")
    steady = (count - first[1]) / max(out.stat().st_mtime - first[0], 1e-9)
    return Run(procs, count, seconds, steady, usage.ru_maxrss / 1024, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="PNGs in the large directory")
    parser.add_argument("--small", type=int, default=2_000, help="PNGs in the small directory")
    parser.add_argument("--procs", type=int, default=2, help="processes of the torchrun runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=8, help="digits_net width")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (torchrun's default, 1, for both)"
    )
    parser.add_argument("--plot", help="write a PNG of throughput and peak RSS here")
    args = parser.parse_args()
    if not 0 < args.small < args.images:
        parser.error("need 0 < --small < --images")

    with tempfile.TemporaryDirectory(prefix="bench_batch_predict-") as tmp:
        work = Path(tmp)
        bundle = make_bundle(work / "bundle", args.width)
        small = make_images(work / "small", args.small)
        large = make_images(work / "large", args.images, seed=1)
        runs = {  # interleaved, so that drifting machine load hits both process counts alike
            (procs, size): run(procs, bundle, images, work, args.batch_size, args.threads)
            for size, images in (("small", small), ("large", large))
            for procs in (1, args.procs)
        }
        print(f"batch size {args.batch_size}, {args.threads} torch thread(s) per process, {os.cpu_count()} CPUs")
        identical = filecmp.cmp(runs[1, "large"].out, runs[args.procs, "large"].out, shallow=False)
        report(runs, args.procs, identical)
    if args.plot:
        plot(runs, args.procs, args.plot)


def report(runs: dict[tuple[int, str], Run], procs: int, identical: bool) -> None:
    print(f"{'processes':>9} {'images':>7} {'seconds':>8} {'images/s':>9} {'steady images/s':>16} {'peak RSS MiB':>13}")
    for r in runs.values():
        rate = r.images / r.seconds
        print(f"{r.procs:>9} {r.images:>7} {r.seconds:>8.2f} {rate:>9.0f} {r.steady_rate:>16.0f} {r.peak_mib:>13.0f}")
    one, many = runs[1, "large"], runs[procs, "large"]
    print(
        f"ratio {procs} processes / 1 process, steady images/s on {one.images} images: "
        f"{many.steady_rate / one.steady_rate:.2f}"
    )
    for p in (1, procs):
        large, small = runs[p, "large"], runs[p, "small"]
        growth = large.peak_mib / small.peak_mib
        print(f"ratio peak RSS {large.images} / {small.images} images, {p} process(es): {growth:.3f}")
    print(f"{procs}-process output identical to 1-process output: {'yes' if identical else 'NO'}")


def plot(runs: dict[tuple[int, str], Run], procs: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{p} process{'es' if p > 1 else ''}" for p in (1, procs)]
    rates = [runs[p, "large"].steady_rate for p in (1, procs)]
    speed.bar(labels, rates, color=["tab:blue", "tab:orange"])
    speed.set_ylabel("images/s (steady)")
    speed.set_title(f"throughput, {runs[1, 'large'].images} PNGs")
    offsets = np.arange(2)
    for shift, size in ((-0.2, "small"), (0.2, "large")):
        heights = [runs[p, size].peak_mib for p in (1, procs)]
        memory.bar(offsets + shift, heights, width=0.4, label=f"{runs[1, size].images} images")
    memory.set_xticks(offsets, labels)
    memory.set_ylabel("peak RSS (MiB, largest process)")
    memory.set_title("memory does not grow with input count")
    memory.legend(loc="lower center")
    figure.tight_layout()
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
