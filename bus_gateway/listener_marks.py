"""Where a restarted gateway's bus listener starts reading: time marks of the positions some listener has read,
kept in the object store so any gateway of the bus (a restarted one, a new one) can use them.

The listener must hold every request and result of the last result TTL (a future promised by any gateway is
answerable by any gateway after it), so it cannot simply resume where it stopped: it starts at the first record
that may be inside the window. Tansu answers offsets_for_times with offset 0 when it has no answer
(local-infra.md 2.1), which made every restart read the whole log (issue 20 item 1). So while reading, the
listener notes marks (timestamp, offset) per partition: "every record before `offset` was produced at or before
`timestamp`" (CreateTime, per partition in produce order), at least every ttl/32 of record time apart, the newest
following the reader. At start, a partition begins at its latest mark older
than the window (less a clock-skew margin); without one it falls back to offsets_for_times.

One JSON document per topic prefix, `gateway/listener-marks/<prefix>.json`: {"<topic>/<partition>": [[ts_ms,
offset], ...]}. Gateways overwrite each other's documents; any of them is a valid start (they read the same log).
"""

from __future__ import annotations

import json
import logging

from aiokafka import TopicPartition

from artifact_store import ObjectStore

log = logging.getLogger(__name__)

CLOCK_SKEW_MS = 60_000  # producers' clocks may disagree by this much: start that much earlier
MARKS_PER_WINDOW = 32  # marks kept per result-TTL window and partition (the start is at most ttl/32 early)

Mark = tuple[int, int]  # (timestamp ms, offset)


def marks_key(prefix: str) -> str:
    return f"gateway/listener-marks/{prefix}.json"


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


class ListenerMarks:
    def __init__(self, store: ObjectStore, prefix: str, ttl_s: float) -> None:
        self.store = store
        self.key = marks_key(prefix)
        self.ttl_ms = int(ttl_s * 1000)
        self.every_ms = max(1, self.ttl_ms // MARKS_PER_WINDOW)
        self.marks: dict[str, list[Mark]] = {}
        self.dirty = False

    def load(self) -> None:
        """Read the stored marks (blocking: call in a thread). A missing or unreadable document means none."""
        raw = self.store.get_bytes_or_none(self.key)
        if raw is None:
            return
        try:
            doc = json.loads(raw)
            self.marks = {name: [(int(ts), int(offset)) for ts, offset in found] for name, found in doc.items()}
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable listener marks at %s: %s", self.key, exc)

    def save(self) -> None:
        """Write the marks (blocking: call in a thread)."""
        self.dirty = False
        self.store.put_bytes(self.key, json.dumps(self.marks).encode(), "application/json")

    def cutoff_ms(self, now_ms: int) -> int:
        """Records produced before this are outside the window, whatever the producers' clocks said."""
        return now_ms - self.ttl_ms - CLOCK_SKEW_MS

    def start_offset(self, tp: TopicPartition, now_ms: int) -> int | None:
        """The latest marked offset whose earlier records are all outside the window; None: no such mark."""
        cutoff = self.cutoff_ms(now_ms)
        older = [offset for ts, offset in self.marks.get(_name(tp), ()) if ts < cutoff]
        return max(older) if older else None

    def note(self, tp: TopicPartition, timestamp_ms: int, offset: int, now_ms: int) -> None:
        """The listener read the record at `offset`, produced at `timestamp_ms`."""
        found = self.marks.setdefault(_name(tp), [])
        mark = (timestamp_ms, offset + 1)  # every record before offset + 1 is at most this old
        if found and mark[1] <= found[-1][1]:
            return
        if len(found) >= 2 and timestamp_ms - found[-2][0] < self.every_ms:
            found[-1] = mark  # the newest mark follows the reader until it is every_ms past the one before
        else:
            found.append(mark)
        # Keep the latest mark outside the window (the next start) and all newer ones.
        cutoff = self.cutoff_ms(now_ms)
        outside = [i for i, (ts, _) in enumerate(found) if ts < cutoff]
        if len(outside) > 1:
            del found[:outside[-1]]
        self.dirty = True
