"""Observability on the gateway: Prometheus /metrics, the live /dashboard, queue state for try_again answers.

app.py registers `ROUTES`, `metrics_middleware` (outermost), `PUBLIC_PATHS` (no key needed) and calls
`instrument(app_state, gateway)` once the gateway has started.
"""

from __future__ import annotations

from typing import Any

from bus_gateway.observability.metrics import GatewayMetrics
from bus_gateway.observability.middleware import METRICS_STATE_KEY, metrics_middleware
from bus_gateway.observability.queue_state import QueueState, QueueView
from bus_gateway.observability.routes import PUBLIC_PATHS, QUEUE_VIEW_STATE_KEY, ROUTES

__all__ = ["PUBLIC_PATHS", "ROUTES", "QueueState", "instrument", "metrics_middleware", "queue_state", "state"]


def state(objects: Any) -> dict[str, Any]:
    """The app-state entries the middleware and routes read."""
    return {METRICS_STATE_KEY: GatewayMetrics(), QUEUE_VIEW_STATE_KEY: QueueView(objects)}


def instrument(app_state: Any, gateway: Any) -> None:
    """Time the started gateway's Kafka produce calls (per request topic); count what its bus listener drops."""
    metrics: GatewayMetrics = app_state[METRICS_STATE_KEY]
    metrics.count_unverified(gateway.listener.unverified)
    topics = gateway.settings.topics
    producer = gateway.producer
    producer.send_and_wait = metrics.timed_send(producer.send_and_wait, {topics.train: "train",
                                                                          topics.sample: "sample"})


async def queue_state(app_state: Any, request_type: str) -> QueueState:
    """The queue state a try_again answer for a `request_type` request carries."""
    view: QueueView = app_state[QUEUE_VIEW_STATE_KEY]
    return await view.state_for(request_type)
