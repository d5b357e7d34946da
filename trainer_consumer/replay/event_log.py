"""Reading the event log: from the broker (bus_runtime.log_reader.read_bus) or from an exported file.

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
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import msgpack

from bus_events import BlobStore
from bus_runtime.log_reader import LogRecord, Progress

FILE_MAGIC = "tinker-bus-log"
FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
