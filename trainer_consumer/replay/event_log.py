"""Reading the event log: from the broker (to its end, without a consumer group) or from an exported file.

From the broker: every partition of the requested topics is assigned explicitly and read from offset 0; a
partition is done when the consumer's position reaches the fetch high-watermark (`consumer.highwater(tp)` after
a fetch). End offsets / `latest` are never asked: Tansu answers ListOffsets(LATEST) wrongly (local-infra.md 2.1).
An idle timeout ends the read if the broker stops answering.

The export file (`tinker-bus export-log`) is a msgpack stream: a header map, then one map per record
    {"topic", "partition", "offset", "timestamp", "key", "value", "headers", "claim"}
where `value` holds the record's bytes as they were on the bus and `headers` its headers (so its signature can be
checked, bus_events.signing), and `claim` the claim-checked payload body when the envelope has a `payload_ref`
(checked against its sha256 on use), so the file alone reproduces the run on another machine. Version 1 files
inlined the claim check into `value` and kept no headers: they replay only without event keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
from aiokafka import TopicPartition

from bus_events import BlobStore
from bus_runtime.kafka_io import make_consumer
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)

FILE_MAGIC = "tinker-bus-log"
FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    claim: bytes | None = None  # in an export file: the body of the envelope's payload_ref


class RecordBlobs:
    """The blob store a record's claim check is read from: the body exported with it, else the live bucket."""

    def __init__(self, record: LogRecord, live: BlobStore | None):
        self.record, self.live = record, live

    def get_blob(self, key: str) -> bytes:
        if self.record.claim is not None:
            return self.record.claim  # the envelope's sha256 still checks it
        if self.live is None:
            raise LookupError(f"claim check {key} is neither in the export nor readable (no bucket: --offline)")
        return self.live.get_blob(key)

    def put_blob(self, key: str, data: bytes) -> None:
        raise PermissionError(f"a replay writes no claim checks ({key})")


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


def claim_check_body(value: bytes, blobs: BlobStore | None) -> bytes | None:
    """The claim-checked payload body of an envelope (checked against its sha256), None when it has none."""
    try:
        envelope = msgpack.unpackb(value, raw=False)
    except Exception:
        return None  # poison: archived as it was on the bus
    ref = envelope.get("payload_ref") if isinstance(envelope, dict) else None
    if not isinstance(ref, dict) or blobs is None:
        return None
    body = blobs.get_blob(ref["key"])
    if hashlib.sha256(body).hexdigest() != ref.get("sha256"):
        raise ValueError(f"claim check {ref['key']} fails its sha256")
    return body


# ---------------------------------------------------------------------- the export file


def write_header(fh: IO[bytes], **meta: Any) -> None:
    fh.write(msgpack.packb({"format": FILE_MAGIC, "version": FILE_VERSION, "exported_at": time.time(), **meta},
                           use_bin_type=True))


def write_record(fh: IO[bytes], record: LogRecord) -> None:
    fh.write(msgpack.packb(asdict(record), use_bin_type=True))


def read_file(path: Path) -> tuple[dict[str, Any], Iterator[LogRecord]]:
    """The header and an iterator over the records of an export file."""
    fh = path.open("rb")
    unpacker = msgpack.Unpacker(fh, raw=False, max_buffer_size=1 << 30)
    try:
        header = next(unpacker)
    except StopIteration:
        fh.close()
        raise ValueError(f"{path} is empty") from None
    if not isinstance(header, dict) or header.get("format") != FILE_MAGIC:
        fh.close()
        raise ValueError(f"{path} is not a tinker-bus log export")
    if header.get("version") not in READABLE_VERSIONS:
        fh.close()
        raise ValueError(f"{path}: export format version {header.get('version')} (this tool reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")

    def records() -> Iterator[LogRecord]:
        with fh:
            for item in unpacker:
                item["headers"] = [tuple(h) for h in item.get("headers", ())]
                yield LogRecord(**item)

    return header, records()


async def iterate_file(records: Iterator[LogRecord], total: int | None = None,
                       progress: Progress | None = None) -> AsyncIterator[LogRecord]:
    """A file's records as an async stream (yielding to the event loop now and then), with progress."""
    count = 0
    for count, record in enumerate(records, 1):
        yield record
        if count % 64 == 0:
            if progress is not None:
                progress(count, total)
            await asyncio.sleep(0)
    if progress is not None:
        progress(count, count)
