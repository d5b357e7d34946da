"""Reading the event log from the broker: every partition of the requested topics, to its end, without a consumer
group. Shared by `tinker-bus replay` / `export-log` (trainer_consumer/replay/event_log.py) and the gateway's session
trace export.

Every partition is assigned explicitly and read from offset 0; a partition is done when the consumer's position
reaches the fetch high-watermark (`consumer.highwater(tp)` after a fetch). End offsets / `latest` are never asked:
Tansu answers ListOffsets(LATEST) wrongly (local-infra.md 2.1). An idle timeout ends the read if the broker stops
answering.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from bus_runtime.kafka_io import make_consumer
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)

FETCH_TIMEOUT_MS = 200
FETCH_MAX_RECORDS = 1000

KeyFilter = Callable[[bytes | None], bool]
Progress = Callable[[int, int | None], None]  # (records read so far, total when known)


@dataclass(frozen=True)
class LogRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch (the record's CreateTime)
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)  # as on the bus: the signature is among them
    claim: bytes | None = None  # in an export file: the body of the envelope's payload_ref


def model_key_filter(model_ids: list[str] | tuple[str, ...] = (),
                     session_ids: list[str] | tuple[str, ...] = ()) -> KeyFilter:
    """Records of these models, and of every training model of these sessions ("<session>:train:<n>")."""
    keys = {m.encode() for m in model_ids}
    prefixes = tuple(f"{s}:train:".encode() for s in session_ids)

    def wanted(key: bytes | None) -> bool:
        return key is not None and (key in keys or (bool(prefixes) and key.startswith(prefixes)))

    return wanted


async def read_bus(settings: BusSettings, topics: list[str], key_filter: KeyFilter, *,
                   idle_timeout_s: float = 10.0, progress: Progress | None = None) -> AsyncIterator[LogRecord]:
    """Every record of `topics` whose key passes `key_filter`, partition by partition in offset order."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()  # metadata, so partitions_for_topic knows them
        tps = [TopicPartition(topic, n) for topic in topics for n in sorted(consumer.partitions_for_topic(topic)
                                                                            or ())]
        missing = [t for t in topics if not any(tp.topic == t for tp in tps)]
        if missing:
            raise LookupError(f"no such topic on {settings.kafka_bootstrap}: {missing}")
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        pending, read, last_data = set(tps), 0, time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS)
            for records in batches.values():
                for r in records:
                    read += 1
                    if key_filter(r.key):
                        yield LogRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value or b"",
                                        list(r.headers or ()))
            if batches:
                last_data = time.monotonic()
            for tp in list(pending):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    pending.discard(tp)
            if progress is not None:
                known = [consumer.highwater(tp) for tp in tps]
                progress(read, sum(known) if all(h is not None for h in known) else None)
            if pending and time.monotonic() - last_data > idle_timeout_s:
                log.warning("no data from %s for %.0f s; stopping the read with %d partition(s) not at their "
                            "high-watermark", settings.kafka_bootstrap, idle_timeout_s, len(pending))
                break
    finally:
        await consumer.stop()
