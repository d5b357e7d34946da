"""Reading the event log: from the broker (bus_runtime.log_reader.read_bus) or from an exported file.

The export file (`tinker-bus export-log`) is a msgpack stream: a header map, then one map per record
    {"topic", "partition", "offset", "timestamp", "key", "value"}
where `value` holds the record's envelope bytes, with a claim-checked payload inlined (the envelope's
`payload_ref` replaced by its `payload`), so the file alone reproduces the run on another machine.
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
FILE_VERSION = 1


def inline_claim_check(value: bytes, blobs: BlobStore | None) -> bytes:
    """The envelope with a claim-checked payload fetched (and checked) into it; other bytes come back as they are."""
    try:
        envelope = msgpack.unpackb(value, raw=False)
    except Exception:
        return value  # poison: archived as it was on the bus
    ref = envelope.get("payload_ref") if isinstance(envelope, dict) else None
    if not isinstance(ref, dict) or blobs is None:
        return value
    body = blobs.get_blob(ref["key"])
    if hashlib.sha256(body).hexdigest() != ref.get("sha256"):
        raise ValueError(f"claim check {ref['key']} fails its sha256")
    envelope.pop("payload_ref")
    envelope["payload"] = msgpack.unpackb(body, raw=False)
    return msgpack.packb(envelope, use_bin_type=True)


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
    if header.get("version") != FILE_VERSION:
        fh.close()
        raise ValueError(f"{path}: export format version {header.get('version')} (this tool reads {FILE_VERSION})")

    def records() -> Iterator[LogRecord]:
        with fh:
            for item in unpacker:
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
