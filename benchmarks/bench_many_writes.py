"""What an atomic file write costs in a directory of many files, with and without a shared listing.

Each :func:`trainfer.atomic.atomic_file` looks for a killed earlier write's journal beside its target, which
lists the directory: ``n`` writes into a directory of ``n`` files read ``n**2`` names. A writer of many files
(``predict --explain``'s PNGs) passes one :class:`trainfer.atomic.Leftovers`, which lists each directory once.
Fills a temporary directory with ``--entries`` empty files, then times ``--writes`` one-byte writes each way,
interleaved for ``--rounds`` rounds, and prints the CPU time a write (process time: stable on a shared machine)
and the wall clock::

    .venv/bin/python benchmarks/bench_many_writes.py [--entries 20000] [--writes 200] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from trainfer.atomic import Leftovers, atomic_file


def timed_writes(directory: Path, count: int, tag: str, leftovers: Leftovers | None) -> tuple[float, float]:
    """CPU and wall seconds a write, for ``count`` writes of new files named after ``tag``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        with atomic_file(directory / f"{tag}{i:05d}.bin", leftovers) as tmp:
            tmp.write_bytes(b"x")
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000, help="files in the directory before timing")
    parser.add_argument("--writes", type=int, default=200, help="writes timed each way, each round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        for i in range(args.entries):
            (directory / f"{i:06d}.png").touch()
        print(f"| round | writes | ms of CPU a write (wall) | ({args.entries} entries before the first write) |")
        print("|---|---|---|---|")
        for round_ in range(args.rounds):
            for label, leftovers in (("each write lists the directory", None), ("one shared Leftovers", Leftovers())):
                cpu, wall = timed_writes(directory, args.writes, f"r{round_}-{leftovers is not None:d}-", leftovers)
                print(f"| {round_ + 1} | {label} | {1e3 * cpu:.2f} ({1e3 * wall:.2f}) | |")


if __name__ == "__main__":
    main()
