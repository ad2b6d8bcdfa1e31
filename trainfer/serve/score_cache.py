"""The Predictor's optional LRU cache of per-head scores, keyed by a hash of each preprocessed sample.

Thread model: lookups and stores hold the owner's lock (the one that also guards its
:class:`~trainfer.serve.results.Timings`, where hits and misses are counted); the scores of the
missed samples are computed outside it, so other threads' batches run meanwhile.

A hit returns the scores computed in an earlier batch; the missed samples run in a batch of their own.
float32 results depend on the batch a sample runs in, so answers can differ in their last bits with what
was cached (docs/serving.md, "Cache"): not bit-stable, by design (it would take running every sample in the
same batch as before).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from trainfer.serve.results import Timings


class ScoreCache:
    """At most ``size`` rows of per-head scores, least recently used evicted first."""

    def __init__(self, size: int, lock: threading.Lock):
        self.size = size
        self._lock = lock
        self._rows: OrderedDict[bytes, list[Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def scores(
        self, batch: Tensor, compute: Callable[[Tensor], list[Tensor]], timings: Timings, heads: int
    ) -> list[Tensor]:
        """Scores per head, computing (``compute``) only samples whose preprocessed bytes are not cached."""
        keys = [sample_key(sample) for sample in batch]
        with self._lock:
            rows: list[list[Tensor] | None] = [self._rows.get(key) for key in keys]
            misses = [i for i, row in enumerate(rows) if row is None]
            timings.cache_hits += len(keys) - len(misses)
            timings.cache_misses += len(misses)
        if misses:  # computed outside the lock: other threads' batches run meanwhile
            fresh = compute(batch[misses])
            for j, i in enumerate(misses):
                rows[i] = [scores[j] for scores in fresh]
        with self._lock:
            for key, row in zip(keys, rows, strict=True):
                self._rows[key] = row  # type: ignore[assignment]
                self._rows.move_to_end(key)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)
        return [torch.stack([row[h] for row in rows]) for h in range(heads)]  # type: ignore[index]


def sample_key(sample: Tensor) -> bytes:
    """A 128-bit BLAKE2b of a sample's dtype, shape and bytes."""
    data = sample.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.digest()
