"""A decoded training event as the engine sees it, where on the bus it came from, and the replies it gets."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from bus_events import Envelope
from bus_runtime.doors import Door


@dataclass(frozen=True)
class BusPosition:
    """Where a record sits in the log (a Kafka notion: the engine only uses it for offsets and partitions)."""

    topic: str
    partition: int
    offset: int


@dataclass(eq=False)
class Inbound:
    env: Envelope
    payload: msgspec.Struct  # the payload struct of env.type (bus_events.PAYLOAD_TYPES); handlers receive it typed
    position: BusPosition | None = None
    # For seq_void items: the type of the request whose seq_id is void, when known (None: could be anything).
    voided_type: str | None = None
    door: Door | None = None  # the asking gateway's reply door (bus_runtime/doors.py), if its record named one
