"""Which trainer's intake door takes the requests of which training-topic partition, read from the trainers'
heartbeats in S3 (bus_runtime/health.py), so that the gateway hands each training request to the trainer that
reads it (bus_runtime/doors.py): its bytes as its produce starts, then, once the broker acknowledged it, its offset.
The bytes cross while the broker writes, so a big step reaches its trainer a frame of a few bytes after the ack.

S3, not the reply headers: a door takes requests into a trainer, so its token must not be readable from a topic.
Read while this gateway publishes training requests, at most every HEARTBEAT_INTERVAL_S (an idle gateway reads
nothing). A map a rebalance made stale costs nothing: a trainer that no longer reads a partition leaves what it is
handed to the fetch of the partition's new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from artifact_store import ObjectStore
from bus_runtime.doors import BusRecord, Door, DoorBell, Ticket
from bus_runtime.health import HEARTBEAT_INTERVAL_S, read_health

log = logging.getLogger(__name__)


class IntakeDoors:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self.doors: dict[int, Door] = {}  # training-topic partition -> its trainer's door
        self.bell = DoorBell()
        self._read_at = float("-inf")
        self._reading: asyncio.Task | None = None

    def read(self) -> dict[int, Door]:
        """The live trainers' doors by partition (blocking: S3)."""
        doors: dict[int, Door] = {}
        for worker in read_health(self.objects):
            door = Door.parse(worker.detail.get("intake_door")) if worker.role == "trainer" and worker.alive \
                else None
            if door is not None:
                doors.update({int(n): door for n in worker.detail.get("partitions", ())})
        return doors

    async def _refresh(self) -> None:
        try:
            self.doors = await asyncio.to_thread(self.read)
        except Exception:  # S3 away for a moment: keep the doors known; every request still goes by Kafka
            log.exception("reading the trainers' intake doors failed")

    def handover(self) -> Handover:
        """How the next training request goes to its trainer's door (kafka_io.publish announces it to it)."""
        if time.monotonic() - self._read_at >= HEARTBEAT_INTERVAL_S and (self._reading is None or self._reading.done()):
            self._read_at = time.monotonic()
            self._reading = asyncio.create_task(self._refresh(), name="gateway-intake-doors")
        return Handover(self)

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        await self.bell.close()


class Handover:
    """One training request on its way to its trainer's door: `announce` as its produce starts (when its partition
    is known by then), `settle` once the broker answered (None: the produce failed)."""

    def __init__(self, doors: IntakeDoors):
        self._doors = doors
        self._ticket: Ticket | None = None

    def announce(self, record: BusRecord) -> None:
        self._ticket = self._doors.bell.announce(self._doors.doors.get(record.partition), record)

    def settle(self, record: BusRecord | None) -> None:
        if self._ticket is not None:
            self._doors.bell.settle(self._ticket, record)
        elif record is not None:  # not announced: hand the whole acknowledged record
            self._doors.bell.ring(self._doors.doors.get(record.partition), record)
