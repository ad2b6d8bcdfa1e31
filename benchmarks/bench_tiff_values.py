"""What opening a TIFF costs trainfer's image reader: crafted files whose numeric entries hold millions of
values (Pillow decodes them one at a time in Python), one at ``MAX_TIFF_VALUES``, and plain files.

Prints, per file, the best of ``--rounds`` CPU times (1 torch thread) and wall clocks of
``trainfer.serve.readers.load_image`` and whether it decoded or refused the file. Compare two trainfer
versions by running it with each on ``PYTHONPATH``, interleaved::

    PYTHONPATH=. python benchmarks/bench_tiff_values.py
"""

from __future__ import annotations

import argparse
import io
import struct
import time
import warnings

import numpy as np
import torch
from PIL import Image

from trainfer.errors import InputError
from trainfer.serve.preprocess import PreprocessSpec
from trainfer.serve.readers import load_image

#: An uncompressed 8 x 8 grayscale TIFF whose pixels start at offset 8: tag -> (type, count, value).
TIFF_8X8 = {256: (3, 1, 8), 257: (3, 1, 8), 258: (3, 1, 8), 259: (3, 1, 1), 262: (3, 1, 1)}
TIFF_8X8 |= {273: (4, 1, 8), 277: (3, 1, 1), 278: (3, 1, 8), 279: (4, 1, 64)}


def tiff_with_shorts(tag: int, count: int) -> bytes:
    """The 8 x 8 TIFF whose entry ``tag`` holds ``count`` SHORT values of 8 (a BitsPerSample of 8 per sample)."""
    entries = {**TIFF_8X8, tag: (3, count, 8 + 64)}
    table = b"".join(struct.pack("<HHII", key, *entries[key]) for key in sorted(entries))
    data = bytes(64) + struct.pack("<H", 8) * count
    return b"II*\0" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(entries)) + table + bytes(4)


def plain_tiff(size: int) -> bytes:
    """A ``size`` x ``size`` RGB TIFF of noise as Pillow writes it."""
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
    Image.fromarray(pixels).save(out, "TIFF")
    return out.getvalue()


FILES = {
    "BitsPerSample of 4,000,000 values": lambda: tiff_with_shorts(258, 4_000_000),
    "BitsPerSample of 8,000,000 values (the server's 16 MB body)": lambda: tiff_with_shorts(258, 8_000_000),
    "SampleFormat of 4,000,000 values": lambda: tiff_with_shorts(339, 4_000_000),
    "BitsPerSample at MAX_TIFF_VALUES (2**20 values in all)": lambda: tiff_with_shorts(258, 2**20 - 8),
    "plain 64 x 64 RGB": lambda: plain_tiff(64),
    "plain 1000 x 1000 RGB": lambda: plain_tiff(1000),
}


def measure(data: bytes, rounds: int) -> tuple[float, float, str]:
    """The best CPU time and wall clock (seconds) of ``rounds`` reads of ``data``, and what the reader did."""
    spec, best, outcome = PreprocessSpec(input_shape=(3, 8, 8)), (float("inf"), float("inf")), ""
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            load_image(io.BytesIO(data), spec)
            outcome = "decoded"
        except InputError as error:
            outcome = "refused: " + str(error).split("' ", 1)[-1]
        best = min(best, (time.process_time() - cpu, time.perf_counter() - wall))
    return *best, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="reads of each file; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # Pillow warns about the crafted entries
    for name, make in FILES.items():
        data = make()
        cpu, wall, outcome = measure(data, args.rounds)
        print(f"{name} ({len(data)} bytes): cpu {cpu * 1e3:.2f} ms, wall {wall * 1e3:.2f} ms; {outcome}")


if __name__ == "__main__":
    main()
