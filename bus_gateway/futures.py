"""The future table: every request the bus has seen in the last result TTL, and its result once it arrived.

Entries come from three places: this gateway's own POSTs, request events other gateways published (read
by the bus listener), and result events (read by the bus listener). So any gateway instance can answer
retrieve_future for any request, and a retried POST that lands on another instance still finds the first
promise through the (model_id, seq_id) index.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from bus_events import EventType
from bus_events import payloads as p

DedupeKey = tuple[str, int]
IdempotencyKey = tuple[str, str, str]  # (tenant, event type, X-Idempotency-Key)


# The X-Idempotency-Key of the HTTP request being handled (set per request by the app's before_request hook).
IDEMPOTENCY_KEY: ContextVar[str | None] = ContextVar("idempotency_key", default=None)


def new_request_id(now: float | None = None) -> str:
    """`req-<ms since epoch, hex>-<random>`: the creation time lets any gateway tell "expired" from "unknown"."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"req-{millis:x}-{uuid.uuid4().hex[:20]}"


def request_id_time(request_id: str) -> float | None:
    parts = request_id.split("-")
    if len(parts) != 3 or parts[0] != "req":
        return None
    try:
        return int(parts[1], 16) / 1000
    except ValueError:
        return None


@dataclass(eq=False)
class Future:
    request_id: str
    tenant: str
    request_type: str  # an EventType value
    model_id: str
    seq_id: int | None = None
    created_at: float = field(default_factory=time.time)
    local: bool = False  # POSTed to this gateway instance
    result: p.Result | None = None
    resolved_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Facts only the accepting gateway knows (e.g. the model name a JSON-API caller used).
    context: dict[str, Any] = field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None

    @property
    def dedupe_key(self) -> DedupeKey | None:
        if self.seq_id is None or self.request_type == EventType.SEQ_VOID:
            return None
        return (self.model_id, self.seq_id)

    def expires_at(self, ttl_s: float) -> float:
        return max(self.created_at, self.resolved_at or 0.0) + ttl_s

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the result; True once it is there."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout_s)
        return self.done.is_set()


class FutureTable:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._futures: dict[str, Future] = {}
        self._by_seq: dict[DedupeKey, str] = {}
        self._by_idempotency: dict[IdempotencyKey, str] = {}
        self._id_waiters: dict[str, asyncio.Event] = {}
        # Per model (or sampling session): the highest seq_id any request for it carried, and when it was seen,
        # so the gateway can refuse absurd seq_id jumps (Gateway.check_seq_id). Swept like the futures.
        self._highest_seq: dict[str, tuple[int, float]] = {}
        self.local_pending_samples = 0
        self.local_pending = 0  # requests POSTed here whose result has not arrived (the listener's fetch pacing)
        self.on_local_pending: list[Callable[[Future], None]] = []  # told when a local request starts waiting
        self.on_resolve: list[Callable[[Future], None]] = []  # told once per future, when its result arrives

    def __len__(self) -> int:
        return len(self._futures)

    def get(self, request_id: str) -> Future | None:
        fut = self._futures.get(request_id)
        if fut is not None and fut.expires_at(self.ttl_s) < time.time():
            self._drop(fut)
            return None
        return fut

    def first_for(self, key: DedupeKey) -> Future | None:
        """The first request published for (model_id or sampling session, seq_id), if still alive."""
        request_id = self._by_seq.get(key)
        return self.get(request_id) if request_id is not None else None

    def highest_seq(self, key: str) -> int | None:
        """The highest seq_id a live request for `key` carried (None: none seen within the TTL)."""
        found = self._highest_seq.get(key)
        return found[0] if found is not None else None

    def first_for_idempotency(self, key: IdempotencyKey) -> Future | None:
        request_id = self._by_idempotency.get(key)
        return self.get(request_id) if request_id is not None else None

    def add(self, fut: Future) -> Future:
        """Insert `fut`, or return the entry already known under its request id (first writer wins)."""
        existing = self._futures.get(fut.request_id)
        if existing is not None:
            if fut.local and not existing.local:
                existing.local = True
                self._count_local(existing, 1)
            existing.context.update(fut.context)
            return existing
        self._futures[fut.request_id] = fut
        key = fut.dedupe_key
        if key is not None:
            self._by_seq.setdefault(key, fut.request_id)
            highest = self._highest_seq.get(key[0])
            self._highest_seq[key[0]] = (max(key[1], highest[0] if highest else key[1]), fut.created_at)
        if fut.idempotency_key is not None:
            self._by_idempotency.setdefault(fut.idempotency_key, fut.request_id)
        if fut.local:
            self._count_local(fut, 1)
        waiter = self._id_waiters.get(fut.request_id)
        if waiter is not None:
            waiter.set()
        return fut

    def resolve(self, request_id: str, result: p.Result, *, tenant: str, model_id: str, seq_id: int | None) -> Future:
        fut = self._futures.get(request_id)
        if fut is None:
            # A result whose request we never saw (published before our replay window, or by hand).
            fut = self.add(Future(request_id, tenant, result.request_type, model_id, seq_id))
        if fut.result is None:  # workers may re-publish a result on redelivery: the first one counts
            if fut.local:
                self._count_local(fut, -1)
            fut.result = result
            fut.resolved_at = time.time()
            fut.done.set()
            for hook in self.on_resolve:
                hook(fut)
        return fut

    def discard(self, fut: Future) -> None:
        """Forget a request that never made it onto the bus (publish failed)."""
        self._drop(fut)

    def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        expired = [f for f in self._futures.values() if f.expires_at(self.ttl_s) < now]
        for fut in expired:
            self._drop(fut)
        for key in [k for k, (_, seen) in self._highest_seq.items() if seen + self.ttl_s < now]:
            del self._highest_seq[key]
        return len(expired)

    def _drop(self, fut: Future) -> None:
        if self._futures.pop(fut.request_id, None) is None:
            return
        key = fut.dedupe_key
        if key is not None and self._by_seq.get(key) == fut.request_id:
            del self._by_seq[key]
        if fut.idempotency_key is not None and self._by_idempotency.get(fut.idempotency_key) == fut.request_id:
            del self._by_idempotency[fut.idempotency_key]
        if fut.local and fut.result is None:
            self._count_local(fut, -1)

    def _count_local(self, fut: Future, change: int) -> None:
        """A local request started (+1) or stopped (-1) waiting for its result."""
        if fut.result is not None:
            return  # already answered: it never waits
        self.local_pending += change
        if fut.request_type == EventType.SAMPLE:
            self.local_pending_samples += change
        if change > 0:
            for hook in self.on_local_pending:
                hook(fut)

    async def wait_for_id(self, request_id: str, timeout_s: float) -> Future | None:
        """The entry for `request_id`, waiting up to `timeout_s` for the bus listener to bring it."""
        fut = self.get(request_id)
        if fut is not None or timeout_s <= 0:
            return fut
        waiter = self._id_waiters.setdefault(request_id, asyncio.Event())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout_s)
        finally:
            self._id_waiters.pop(request_id, None)
        return self.get(request_id)
