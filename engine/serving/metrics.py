"""Prometheus metrics of the server, in a registry of its own (one per app, so that tests can
run several apps in one process). Served at GET /metrics in the text exposition format.

    vae_serve_requests_total{endpoint, status}         requests answered, by HTTP status
    vae_serve_request_seconds{endpoint}                 latency, body read to reply built
    vae_serve_batch_rows{op}                            rows per model call (the batch size)
    vae_serve_batch_seconds{op}                         model time per call, executor hop included
    vae_serve_queue_depth{op}                           requests waiting for a batch
    vae_serve_ready                                     1 once the model is loaded and warmed

Status 499 counts requests whose client went away before the reply (nginx's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0, 10.0, 30.0)
CLIENT_GONE = 499


def batch_buckets(max_batch: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to max_batch (and max_batch itself): one bucket per doubling."""
    edges, b = [], 1
    while b < max_batch:
        edges.append(float(b))
        b *= 2
    return (*edges, float(max_batch))


class Metrics:
    """The server's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vae_serve_requests", "Requests answered, by endpoint and HTTP"
                                " status", ("endpoint", "status"), registry=r)
        self.latency = Histogram("vae_serve_request_seconds", "Request latency (body read to"
                                 " reply built)", ("endpoint",), buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.batch_rows = Histogram("vae_serve_batch_rows", "Rows per model call",
                                    ("op",), buckets=batch_buckets(max_batch), registry=r)
        self.batch_seconds = Histogram("vae_serve_batch_seconds", "Model time per call",
                                       ("op",), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vae_serve_queue_depth", "Requests waiting for a batch",
                                 ("op",), registry=r)
        self.ready = Gauge("vae_serve_ready", "1 once the model is loaded and warmed",
                           registry=r)
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        children = self._children.get(key)
        if children is None:  # labels() costs a lookup and a lock per call: bind once
            children = self._children[key] = (self.requests.labels(endpoint, str(status)),
                                              self.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def batch_observer(self, op: str) -> Callable[[int, float], None]:
        """The batcher's on_batch callback for `op`: (rows, seconds) -> observed."""
        rows, seconds = self.batch_rows.labels(op), self.batch_seconds.labels(op)

        def observe(n: int, t: float) -> None:
            rows.observe(n)
            seconds.observe(t)

        return observe

    def track_queue(self, op: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(op).set_function(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
