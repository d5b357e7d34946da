"""The gateway's Prometheus metrics, defined once, on the app's own registry (several apps share a test process).

Labels are bounded: `route` is the matched route template (e.g. /api/v1/retrieve_future; "unmatched" for 404s
that hit no route), `method` and `status` are HTTP's, `topic` is one of the bus's request topics. No request-,
session- or model-id labels.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bus_runtime.metrics import LATENCY_BUCKETS_S

UNMATCHED_ROUTE = "unmatched"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tinker_bus_gateway_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("tinker_bus_gateway_http_request_seconds", "HTTP request handling time",
                                 ["method", "route"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.auth_failures = Counter("tinker_bus_gateway_auth_failures", "Requests refused for a missing or "
                                     "invalid API key (401)", registry=r)
        self.futures = Gauge("tinker_bus_gateway_futures", "Futures held, by state", ["state"], registry=r)
        self.pending_samples = Gauge("tinker_bus_gateway_pending_samples",
                                     "Sample requests of this gateway not answered yet", registry=r)
        self.produce_seconds = Histogram("tinker_bus_gateway_produce_seconds",
                                         "Time to publish one event to Kafka (send_and_wait, acks=all)", ["topic"],
                                         buckets=LATENCY_BUCKETS_S, registry=r)

    def count_unverified(self, counts: Mapping[str, int]) -> None:
        """Export the bus listener's count of records dropped for their signature (per topic; bounded: the
        bus's topics only)."""
        self.registry.register(_UnverifiedRecords(counts))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if status == 401:
            self.auth_failures.inc()

    def timed_send(self, send: Callable[..., Awaitable[Any]], topic_kinds: dict[str, str]) -> Callable[..., Any]:
        """`send` (a producer's send_and_wait) timed per topic kind; topics not in `topic_kinds` count as
        "other" (the label stays bounded)."""

        @functools.wraps(send)
        async def timed(topic: str, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await send(topic, *args, **kwargs)
            finally:
                self.produce_seconds.labels(topic_kinds.get(topic, "other")).observe(time.perf_counter() - start)

        return timed


class _UnverifiedRecords(Collector):
    def __init__(self, counts: Mapping[str, int]):
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("tinker_bus_gateway_unverified_records",
                                     "Bus records the gateway dropped: a request not signed by its tenant, or a "
                                     "result not signed with the workers' reply key", labels=["topic"])
        for topic, count in sorted(self.counts.items()):
            family.add_metric([topic], count)
        yield family
