"""Batching for serving: how many samples an input holds, and raw chunks regrouped into batches.

Shared by the Predictor and ensembles; validation of each chunk is the preprocessing spec's
(:meth:`~trainfer.serve.preprocess.PreprocessSpec.check_batch`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from trainfer.serve.preprocess import PreprocessSpec

__all__ = ["sample_count", "timed_batches"]


def sample_count(inputs: Any) -> int | None:
    """How many samples ``inputs`` holds when that is known without reading them (for the progress bar)."""
    if isinstance(inputs, Tensor) or hasattr(inputs, "__array__"):
        return int(inputs.shape[0]) if len(inputs.shape) else None
    return len(inputs) if isinstance(inputs, list | tuple) else None


def timed_batches(chunks: Iterator[Tensor], size: int, spec: PreprocessSpec) -> Iterator[tuple[Tensor, float]]:
    """Regroup validated raw chunks into batches of ``size`` (the last may be smaller), in order.

    Also yields the seconds spent loading and checking each batch's samples.
    """
    buffer: list[Tensor] = []
    count, seconds, seen = 0, 0.0, 0
    while True:
        start = time.perf_counter()
        chunk = next(chunks, None)
        if chunk is not None:
            chunk = spec.check_batch(chunk, seen)
            buffer.append(chunk)
            count += len(chunk)
            seen += len(chunk)
        seconds += time.perf_counter() - start
        while count >= size or (chunk is None and count):
            joined = buffer[0] if len(buffer) == 1 else torch.cat(buffer)
            yield joined[:size], seconds
            buffer = [joined[size:]] if len(joined) > size else []
            count, seconds = max(count - size, 0), 0.0
        if chunk is None:
            return
