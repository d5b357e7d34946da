"""Finished sample requests per (sampling session, clone), in the order they finished: what the SDK's
`/api/v1/retrieve_futures` poller reads (SDK 0.38 `lib/session_futures_poller.py`, tinker-protocol.md 2.3).

Each completion gets the next cursor of its queue; a poll returns every completion after `prev_cursor` and
trims the ones at or before it (the client has seen them). The future table feeds this from the bus listener, so
any gateway answers for requests any gateway accepted. Completions nobody polls expire with the result TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from bus_events import EventType
from bus_gateway.futures import Future

# The SDK numbers a cloned SamplingClient's requests from clone * 1e9: its cloned_sampler_id is seq_id // this.
CLONE_SEQ_SPAN = 1_000_000_000

QueueKey = tuple[str, str, int]  # (tenant, sampling session id, clone)


@dataclass(frozen=True)
class Completion:
    cursor: int
    request_id: str
    failed: bool
    at: float


@dataclass
class _Queue:
    entries: list[Completion] = field(default_factory=list)
    last_cursor: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    touched: float = field(default_factory=time.time)


class CompletionLog:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._queues: dict[QueueKey, _Queue] = {}

    def record(self, fut: Future) -> None:
        """A resolved future (FutureTable.on_resolve): queued if it is a sample."""
        if fut.request_type != EventType.SAMPLE or fut.result is None:
            return
        clone = (fut.seq_id or 0) // CLONE_SEQ_SPAN
        queue = self._queues.setdefault((fut.tenant, fut.model_id, clone), _Queue())
        queue.last_cursor += 1
        queue.entries.append(Completion(queue.last_cursor, fut.request_id, fut.result.error is not None, time.time()))
        queue.touched = time.time()
        queue.changed.set()
        queue.changed = asyncio.Event()  # later waiters wait for the next one

    async def poll(self, key: QueueKey, prev_cursor: int, timeout_s: float) -> tuple[list[Completion], int]:
        """The completions after `prev_cursor` (waiting up to `timeout_s` for one) and the cursor to send back."""
        queue = self._queues.setdefault(key, _Queue())
        queue.touched = time.time()
        queue.entries = [c for c in queue.entries if c.cursor > prev_cursor]
        if not queue.entries and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.changed.wait(), timeout_s)
            queue.entries = [c for c in queue.entries if c.cursor > prev_cursor]
        found = list(queue.entries)
        return found, max([prev_cursor, *(c.cursor for c in found)])

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for key, queue in list(self._queues.items()):
            queue.entries = [c for c in queue.entries if c.at + self.ttl_s >= now]
            if not queue.entries and queue.touched + self.ttl_s < now:
                del self._queues[key]
