"""Prometheus plumbing every part shares: a registry per part, its /metrics server on 127.0.0.1, bounded labels.

Each part builds its metric definitions (TrainerMetrics, SamplerMetrics, GatewayMetrics) on its own
CollectorRegistry rather than the process-global one: tests run several parts in one process, and a part's
/metrics must show that part only.

    metrics = SamplerMetrics()
    url = serve_metrics(metrics.registry, config.metrics_port)   # "http://127.0.0.1:PORT/metrics"
    async with heartbeating(objects, "sampler", health, metrics_url=url): ...

Label rule: no label takes an unbounded value (request ids, model ids, session ids). A label that names a base
model goes through `bounded_label`, which maps anything outside the configured base models to "other", so the
series count is at most len(settings.base_models) + 1.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from bus_events import payloads as p
from bus_runtime.net import free_port

OTHER_LABEL = "other"
LOOPBACK = "127.0.0.1"
# Seconds buckets from 1 ms to 2 min: a gateway answer, a sample, and a forward_backward of a long batch.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Tokens per second from one token a second up to an H200's prefill rate.
TOKENS_PER_S_BUCKETS = (1, 10, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)


def forward_backward_tokens(payload: object) -> int:
    """Tokens in a forward_backward batch (0 for any other payload): the trainer's and the metrics stream's
    tokens count, one definition."""
    if isinstance(payload, p.ForwardBackward):
        return sum(datum.tokens.numel for datum in payload.data)
    return 0


def bounded_label(value: str, allowed: Collection[str]) -> str:
    """`value` if it is one of `allowed` (e.g. the configured base models), else "other"."""
    return value if value in allowed else OTHER_LABEL


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `close()` stops it (tests, graceful stops)."""

    url: str
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int = 0) -> MetricsServer:
    """Serve `registry` at http://127.0.0.1:PORT/metrics on a daemon thread; port 0 takes a free one."""
    if port < 0:
        raise ValueError(f"metrics_port must be >= 0 (0 = any free port), got {port}")
    port = port or free_port()
    server, thread = start_http_server(port, addr=LOOPBACK, registry=registry)
    return MetricsServer(f"http://{LOOPBACK}:{port}/metrics", server, thread)
