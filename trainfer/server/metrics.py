"""The server's Prometheus metrics, in a registry of its own (one per app, never process-global).

=====================================  =========  =============================================
name                                   type       labels / meaning
=====================================  =========  =============================================
``trainfer_requests_total``            counter    ``endpoint``, ``status``: requests answered
``trainfer_request_seconds``           histogram  ``endpoint``: time from request to response
``trainfer_queue_samples``             gauge      ``model``: samples waiting for a batch
``trainfer_batch_samples``             histogram  ``model``: samples per batch run
``trainfer_inference_seconds``         histogram  ``model``: seconds per batch in the model (timed on
                                                  the thread that runs it)
=====================================  =========  =============================================
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trainfer.server.batching import BatchStats

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one app; :meth:`render` gives the exposition text."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "trainfer_requests", "Requests answered", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "trainfer_request_seconds",
            "Seconds from request to response",
            ["endpoint"],
            buckets=_LATENCY,
            registry=self.registry,
        )
        self._counters: dict[tuple[str, int], Counter] = {}  # bounded: endpoint labels x HTTP statuses
        self._latencies: dict[str, Histogram] = {}
        self.queue = Gauge("trainfer_queue_samples", "Samples waiting for a batch", ["model"], registry=self.registry)
        sizes = sorted({2**i for i in range(max_batch.bit_length() + 1)} | {max_batch})
        self.batch = Histogram(
            "trainfer_batch_samples", "Samples per batch", ["model"], buckets=sizes, registry=self.registry
        )
        self.inference = Histogram(
            "trainfer_inference_seconds",
            "Seconds per batch in the model",
            ["model"],
            buckets=_LATENCY,
            registry=self.registry,
        )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        counter = self._counters.get((endpoint, status))
        if counter is None:  # labels() takes a lock and builds its key on every call: look each up once
            counter = self._counters[endpoint, status] = self.requests.labels(endpoint, str(status))
        histogram = self._latencies.get(endpoint)
        if histogram is None:
            histogram = self._latencies[endpoint] = self.latency.labels(endpoint)
        counter.inc()
        histogram.observe(seconds)

    def batch_stats(self, model: str) -> BatchStats:
        """Observers that a model's batcher reports to."""
        queue, batch, inference = self.queue.labels(model), self.batch.labels(model), self.inference.labels(model)

        def on_batch(samples: int, seconds: float) -> None:
            batch.observe(samples)
            inference.observe(seconds)

        return BatchStats(queue_depth=queue.set, batch=on_batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)
