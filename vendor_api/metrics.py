"""Prometheus metrics of one vendor process, in their own registry (one per app instance,
so several apps in one test process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class VendorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vendor_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.items = Counter("vendor_items", "Items embedded by tower", ["tower"], registry=r)
        self.units = Counter("vendor_units_charged", "Units debited (before refunds)", registry=r)
        self.refunds = Counter("vendor_units_refunded", "Units refunded after failed inference", registry=r)
        self.replays = Counter("vendor_idempotent_replays", "Answers replayed for a repeated Idempotency-Key", registry=r)
        self.rejected_overload = Counter("vendor_rejected_overload", "Requests refused because the queue was full", registry=r)
        self.batch_size = Histogram("vendor_batch_size", "Items per model batch", ["tower"], buckets=_BATCH_BUCKETS, registry=r)
        self.queue_seconds = Histogram("vendor_queue_seconds", "Time an item waited for its batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("vendor_inference_seconds", "Model time per batch", ["tower"], buckets=_LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("vendor_request_seconds", "End-to-end request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vendor_queue_depth", "Items waiting for the model", registry=r)

    def observe_batch(self, tower: str, size: int, seconds: float, waits: list[float]) -> None:
        self.batch_size.labels(tower).observe(size)
        self.inference_seconds.labels(tower).observe(seconds)
        self.items.labels(tower).inc(size)
        for wait in waits:
            self.queue_seconds.observe(wait)
