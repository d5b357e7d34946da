"""Sampling progress for streamed requests: the bus listener hands every `sample_delta` it reads to `deliver`,
and a route streaming a request it published reads them from its subscription. Deltas of requests nobody here
streams (other gateways', finished ones) are dropped."""

from __future__ import annotations

import asyncio

from bus_events import payloads as p


class DeltaRouter:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[p.SampleDelta]] = {}

    def subscribe(self, request_id: str) -> asyncio.Queue[p.SampleDelta]:
        """Call right after publishing the request, before the next await, so no delta can come first."""
        return self._queues.setdefault(request_id, asyncio.Queue())

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def deliver(self, request_id: str, delta: p.SampleDelta) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(delta)
