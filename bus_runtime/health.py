"""Consumer liveness: each worker writes a small heartbeat document to S3; /healthz reads them.

S3 rather than Kafka because a gateway must answer "is a trainer alive?" without consuming a topic,
and the documents survive for inspection when a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from artifact_store.object_store import ObjectStore

HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 10.0


def instance_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerHealth:
    role: str
    instance: str
    last_seen: float
    detail: dict

    @property
    def alive(self) -> bool:
        return time.time() - self.last_seen < STALE_AFTER_S


def write_heartbeat(store: ObjectStore, role: str, instance: str, detail: dict | None = None) -> None:
    doc = {"role": role, "instance": instance, "last_seen": time.time(), "detail": detail or {}}
    store.put_bytes(f"health/{role}/{instance}.json", json.dumps(doc).encode(), "application/json")


async def heartbeat_loop(store: ObjectStore, role: str, instance: str, detail=None) -> None:
    """Run until cancelled; `detail` is a zero-arg callable giving extra fields (e.g. models loaded)."""
    try:
        while True:
            await asyncio.to_thread(write_heartbeat, store, role, instance, detail() if detail else None)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
    finally:
        # A clean stop removes the document, so /healthz does not count a stopped worker for 10 s.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(store.delete, f"health/{role}/{instance}.json")


def read_health(store: ObjectStore) -> list[WorkerHealth]:
    out = []
    for key in store.list_keys("health/"):
        try:
            doc = json.loads(store.get_bytes(key))
        except Exception:
            continue
        out.append(WorkerHealth(doc["role"], doc["instance"], doc["last_seen"], doc.get("detail", {})))
    return out


@contextlib.asynccontextmanager
async def heartbeating(store: ObjectStore, role: str, detail=None, *,
                      metrics_url: str | None = None) -> AsyncIterator[str]:
    """Heartbeat as `role` for the duration of the block; yields this worker's instance id. `metrics_url` (the
    part's Prometheus endpoint) goes into every heartbeat, so /healthz and the `up` banner list it."""
    instance = instance_id(role)
    if metrics_url is not None:
        own = detail
        detail = lambda: {**(own() if own else {}), "metrics_url": metrics_url}  # noqa: E731
    task = asyncio.create_task(heartbeat_loop(store, role, instance, detail), name=f"{role}-heartbeat")
    try:
        yield instance
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
