"""Why a request is still waiting: the trainers' and samplers' backlog, read from their heartbeats, for the
`queue_state` / `queue_state_reason` of retrieve_future's try_again answers (tinker-protocol.md 2.4).

A trainer reports in its heartbeat detail `queued` (events waiting for compute) and `paused_partitions`
(partitions it stopped fetching for backpressure); a sampler reports `waiting_rows`. A part is backed up when it
paused a partition, or has queued events / waiting rows beyond what it runs at once; no live instance at all is
backed up too (nothing will answer until one starts). Heartbeats are read from S3 at most every
HEARTBEAT_INTERVAL_S, however many requests poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from artifact_store.object_store import ObjectStore
from bus_events import EventType
from bus_runtime.health import HEARTBEAT_INTERVAL_S, WorkerHealth, read_health

ACTIVE = "active"
PAUSED_CAPACITY = "paused_capacity"


@dataclass(frozen=True)
class QueueState:
    queue_state: str = ACTIVE
    queue_state_reason: str | None = None


def role_of(request_type: str) -> str | None:
    """The part that answers `request_type` (None: the gateway answers it itself)."""
    if request_type == EventType.SAMPLE.value:
        return "sampler"
    if request_type in {t.value for t in EventType} and request_type != EventType.RESULT.value:
        return "trainer"
    return None


def assess(role: str, workers: list[WorkerHealth]) -> QueueState:
    alive = [w for w in workers if w.role == role and w.alive]
    if not alive:
        return QueueState(PAUSED_CAPACITY, f"no {role} is running: the request waits on the bus until one starts")
    if role == "trainer":
        queued = sum(int(w.detail.get("queued", 0)) for w in alive)
        paused = sum(len(w.detail.get("paused_partitions", ())) for w in alive)
        if paused:
            return QueueState(PAUSED_CAPACITY, f"trainer at capacity: {queued} events queued for compute, "
                                               f"{paused} partition(s) paused for backpressure")
        if queued > len(alive):
            return QueueState(ACTIVE, f"trainer busy: {queued} events queued for compute")
        return QueueState()
    waiting = sum(int(w.detail.get("waiting_rows", 0)) for w in alive)
    if waiting:
        running = sum(int(w.detail.get("running_rows", 0)) for w in alive)
        return QueueState(PAUSED_CAPACITY, f"sampler at capacity: {running} rows running, {waiting} waiting")
    return QueueState()


class QueueView:
    """Heartbeats, re-read at most every HEARTBEAT_INTERVAL_S (one S3 listing shared by all pollers)."""

    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self._workers: list[WorkerHealth] = []
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def workers(self) -> list[WorkerHealth]:
        async with self._lock:
            if time.monotonic() - self._read_at >= HEARTBEAT_INTERVAL_S:
                with contextlib.suppress(Exception):  # S3 away: keep the last view rather than fail a poll
                    self._workers = await asyncio.to_thread(read_health, self.objects)
                self._read_at = time.monotonic()
            return self._workers

    async def state_for(self, request_type: str) -> QueueState:
        role = role_of(request_type)
        if role is None:
            return QueueState()
        return assess(role, await self.workers())
