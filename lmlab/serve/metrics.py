"""Prometheus metrics of one server (its own registry, so two apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmlab_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmlab_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("lmlab_completion_tokens", "tokens generated", registry=r)
        self.queue = Gauge("lmlab_queue_length", "sequences waiting for a row of the batch", registry=r)
        self.batch = Gauge("lmlab_batch_size", "sequences in the running decode batch", registry=r)
        self.ttft = Histogram("lmlab_time_to_first_token_seconds", "from arrival to the first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("lmlab_request_seconds", "from arrival to the last byte of a generation request",
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def render(self) -> bytes:
        return generate_latest(self.registry)
