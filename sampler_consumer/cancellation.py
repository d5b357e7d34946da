"""Cancelled sample requests (`cancel` events, docs/events.md): remembered until their request is dequeued.

A cancel travels on the request's own partition, after it. The worker checks this set when it takes a request
off its intake queue and again just before handing it to the engine; a request the engine already has runs to
the end and is answered as usual. Entries of requests never seen here (answered by another sampler before a
rebalance, or already computed) expire after the result TTL.
"""

from __future__ import annotations

import time

from bus_events import Envelope, Reply, make_result
from bus_events import payloads as p


class Cancellations:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._cancelled: dict[tuple[str, str], tuple[p.Cancel, float]] = {}  # (tenant, request id) -> cancel

    def __len__(self) -> int:
        return len(self._cancelled)

    def add(self, env: Envelope, cancel: p.Cancel) -> None:
        now = time.monotonic()
        for key in [k for k, (_, at) in self._cancelled.items() if at + self.ttl_s < now]:
            del self._cancelled[key]
        # Keyed by tenant too: a cancel only reaches requests of the tenant it was (signed) for.
        self._cancelled[(env.tenant, cancel.request_id)] = (cancel, now)

    def take(self, request: Envelope) -> Reply | None:
        """The cancelled reply for `request` if a cancel for it arrived (and forget the cancel), else None."""
        found = self._cancelled.pop((request.tenant, request.request_id), None)
        if found is None:
            return None
        reason = f": {found[0].reason}" if found[0].reason else ""
        message = (f"request {request.request_id} was cancelled (cancel_future{reason}) before the sampler "
                   "started it")
        return make_result(request, error=p.ErrorInfo(message=message, category="user"))
