"""Shorter fetch waits while a record is expected soon (issue 14).

Tansu never wakes a long-polling fetch when data arrives (docs/local-infra.md 2.2): a record produced during a
consumer's fetch is seen when that fetch's `fetch_max_wait_ms` runs out, half of it on average per Kafka hop, and
every tiny call crosses two hops. A short wait for every consumer at all times costs CPU on an idle bus (13 % of a
core for broker and clients at 10 ms) and, on a 2-core box, slowed calls down (the fetch loops compete with the
work). So a consumer fetches with `busy_ms` only while its owner expects a record soon, and with the configured
`fetch_max_wait_ms` otherwise:

- the gateway's bus listener while a request this gateway published awaits its result (bus_listener.py);
- a trainer for a while after its last record: a client that called once usually calls again (worker.py); with
  an intake door (bus_runtime/doors.py), after its last record the door did not bring.

A broker that wakes long-polls (Apache Kafka) answers as soon as data arrives either way; there the short wait
only adds empty fetches while busy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class FetchPacer:
    """The fetch wait a consumer should use now: `busy_ms` until `hold_s` after the last `busy()`, or until
    `idle()`, else `idle_ms`. `apply(consumer)` puts it into effect for the consumer's next fetch."""

    def __init__(self, idle_ms: int, busy_ms: int, hold_s: float, clock: Callable[[], float] = time.monotonic):
        if busy_ms < 0 or idle_ms < 0 or hold_s < 0:
            raise ValueError(f"fetch waits ({idle_ms} ms idle, {busy_ms} ms busy) and hold_s ({hold_s}) must be >= 0")
        self.idle_ms = idle_ms
        self.busy_ms = min(busy_ms, idle_ms)  # a longer "busy" wait would only add latency
        self.hold_s = hold_s
        self._clock = clock
        self._until = float("-inf")
        self._applied: int | None = None

    def busy(self) -> None:
        self._until = self._clock() + self.hold_s

    def idle(self) -> None:
        self._until = float("-inf")

    def wait_ms(self) -> int:
        return self.busy_ms if self._clock() < self._until else self.idle_ms

    def apply(self, consumer: Any) -> None:
        wait = self.wait_ms()
        if wait != self._applied and set_fetch_wait(consumer, wait):
            self._applied = wait


def set_fetch_wait(consumer: Any, wait_ms: int) -> bool:
    """Set an aiokafka consumer's fetch wait for its next fetch requests; False before the consumer started, or
    where this aiokafka has no such knob (then the configured wait stays, logged once)."""
    # aiokafka (0.14) has no public setter: its Fetcher (made by start()) reads `_fetch_max_wait_ms` into every
    # FetchRequest it builds.
    if getattr(consumer, "_fetcher", False) is None:
        return False  # not started yet
    fetcher: Any = getattr(consumer, "_fetcher", None)
    if not hasattr(fetcher, "_fetch_max_wait_ms"):
        global _warned
        if not _warned:
            log.warning("this aiokafka has no fetch wait to pace (Fetcher._fetch_max_wait_ms): fetches keep the "
                        "configured fetch_max_wait_ms")
            _warned = True
        return False
    fetcher._fetch_max_wait_ms = wait_ms
    return True


_warned = False
