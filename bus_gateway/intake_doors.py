"""Which trainer's intake door takes the requests of which training-topic partition, read from the trainers'
heartbeats in S3 (bus_runtime/health.py) every HEARTBEAT_INTERVAL_S, so that the gateway hands each training
request, once the broker acknowledged it, to the trainer that reads it (bus_runtime/doors.py).

S3, not the reply headers: a door takes requests into a trainer, so its token must not be readable from a topic.
A map a rebalance made stale costs nothing: the trainer that no longer reads a partition leaves what it is handed
to the fetch of the partition's new owner.
"""

from __future__ import annotations

import asyncio
import logging

from artifact_store import ObjectStore
from bus_runtime.doors import BusRecord, Door, DoorBell
from bus_runtime.health import HEARTBEAT_INTERVAL_S, read_health

log = logging.getLogger(__name__)


class IntakeDoors:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self.doors: dict[int, Door] = {}  # training-topic partition -> its trainer's door
        self.bell = DoorBell()

    def refresh(self) -> None:
        """Read the live trainers' heartbeats (blocking: S3)."""
        doors: dict[int, Door] = {}
        for worker in read_health(self.objects):
            door = Door.parse(worker.detail.get("intake_door")) if worker.role == "trainer" and worker.alive \
                else None
            if door is not None:
                doors.update({int(n): door for n in worker.detail.get("partitions", ())})
        self.doors = doors

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # S3 away for a moment: keep the doors known, and every request still goes by Kafka
                log.exception("reading the trainers' intake doors failed; retrying")
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def hand(self, record: BusRecord) -> None:
        """Hand an acknowledged training request to the door of its partition's trainer, if one is known."""
        self.bell.ring(self.doors.get(record.partition), record)

    async def close(self) -> None:
        await self.bell.close()
