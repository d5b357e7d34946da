"""Which of a model's applied events S3 already holds, and which the log must keep re-readable.

The Kafka log is the source of truth; S3 snapshots only shorten the replay. A trainer may therefore commit a
partition's offset past an event only once the event's effect is durable:

- covered by a snapshot of its model (adapter, AdamW moments and the ModelState record, written at a clean
  gradient window), or
- it changed nothing that outlives it (get_info, a forward pass, a save, an error: see model_state.lasting_key)
  and a progress marker says the model's snapshot is still exact after it (so a restored model continues at the
  right seq_id instead of waiting for seq_ids nobody will send again).

A `DurablePoint` is such a place in one model's history. `Durability` is a model's bookkeeping between two
points: the lowest offset finished since the last capture (the "hold" that commits must not pass), whether a
lasting effect happened since (dirty: only a snapshot can advance the point, a marker cannot), and the single
snapshot or marker write in flight. A write is captured synchronously between two events of the model and
uploaded in the background; its hold stays in force until the upload succeeds, and comes back if it fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, TypeVar

N = TypeVar("N", int, float)


def _max(a: N | None, b: N | None) -> N | None:
    return b if a is None else a if b is None else max(a, b)


def _min(a: N | None, b: N | None) -> N | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class DurablePoint:
    """Every event of the model up to here is applied and answered, and its effect is in S3."""

    last_seq: int | None = None  # every seq_id <= last_seq is applied (or void)
    max_offset: int | None = None  # highest log offset among the model's finished events
    unsequenced_offset: int | None = None  # highest log offset among its finished seq-less (legacy) events

    def covers(self, seq_id: int | None, offset: int | None) -> bool:
        """Whether an event re-read from the log after a restore was already applied and answered before.

        A sequenced event is covered when its seq_id is applied AND it is no newer than the events seen then: a
        later copy of an old seq_id is a client retry, which is answered like any duplicate. Seq-less events are
        applied in log order, so their offset alone tells."""
        if offset is None:
            return False
        if seq_id is None:
            return self.unsequenced_offset is not None and offset <= self.unsequenced_offset
        return (self.last_seq is not None and seq_id <= self.last_seq
                and self.max_offset is not None and offset <= self.max_offset)


WriteKind = Literal["snapshot", "marker"]


@dataclass(frozen=True)
class Capture:
    """A write being uploaded: the point it makes durable and what the model owed before it."""

    kind: WriteKind
    point: DurablePoint
    hold: int | None
    dirty_since: float | None
    steps: int
    forced: bool
    started_at: float  # time.monotonic() at the capture


@dataclass
class Durability:
    point: DurablePoint = field(default_factory=DurablePoint)  # what S3 holds now
    snapshot_version: str | None = None  # manifest version of the snapshot `point` builds on
    # Progress since the last capture.
    applied_seq: int | None = None
    max_offset: int | None = None
    unsequenced_offset: int | None = None
    hold: int | None = None
    dirty_since: float | None = None
    steps: int = 0  # optimizer steps since the last snapshot capture
    forced: bool = False  # a new state (create, load, unload): snapshot at once
    writing: Capture | None = None
    last_write_at: float = field(default_factory=time.monotonic)
    # The last snapshot write: how long it took (capture to upload done) and when it finished.
    last_snapshot_s: float = 0.0
    last_snapshot_done: float = float("-inf")

    @classmethod
    def restored(cls, point: DurablePoint, snapshot_version: str | None) -> Durability:
        return cls(point=point, snapshot_version=snapshot_version, applied_seq=point.last_seq,
                   max_offset=point.max_offset, unsequenced_offset=point.unsequenced_offset)

    # ------------------------------------------------------------------ progress
    def finished(self, seq_id: int | None, offset: int | None, *, applied: bool, holds: bool) -> None:
        """An event of the model was answered. `applied`: it took its seq_id's place (not a duplicate);
        `holds`: the model exists, so the event must stay re-readable until the next capture."""
        if applied and seq_id is not None:
            self.applied_seq = _max(self.applied_seq, seq_id)
        if offset is not None:
            self.max_offset = _max(self.max_offset, offset)
            if seq_id is None and applied:
                self.unsequenced_offset = _max(self.unsequenced_offset, offset)
            if holds:
                self.hold = _min(self.hold, offset)

    def lasting_effect(self, *, optim_step: bool = False, new_state: bool = False) -> None:
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        self.steps += int(optim_step)
        self.forced = self.forced or new_state

    # ------------------------------------------------------------------ what is owed
    @property
    def dirty(self) -> bool:
        return self.dirty_since is not None or self.forced

    def effective_hold(self) -> int | None:
        """The lowest offset a commit must not pass for this model (None: nothing owed)."""
        return _min(self.hold, self.writing.hold if self.writing else None)

    def snapshot_due(self, every_steps: int, interval_s: float, write_share: float = 0.0) -> bool:
        """`write_share` (0 < share <= 1, else no bound): a snapshot due by step count waits until the time since
        the last snapshot finished is at least (1 / share - 1) times what that snapshot took, so snapshot writes
        fill at most that share of the time. A big adapter stepping fast (8B: ~1 GB of weights and moments every
        10 steps of 0.26 s) was otherwise always uploading, which cost its training ~8 %. New states and the
        time trigger are not held back."""
        if self.writing is not None or not self.dirty:
            return False
        now = time.monotonic()
        if self.forced:
            return True
        if interval_s > 0 and self.dirty_since is not None and now - self.dirty_since >= interval_s:
            return True
        if every_steps <= 0 or self.steps < every_steps:
            return False
        if not 0 < write_share <= 1:
            return True
        return now - self.last_snapshot_done >= self.last_snapshot_s * (1 / write_share - 1)

    def marker_due(self, min_interval_s: float) -> bool:
        """Only events without lasting effect since the snapshot: a small marker advances the point (rate-limited,
        so a stream of forward passes costs one small write per interval, not one per event)."""
        return (self.writing is None and not self.dirty and self.hold is not None
                and self.snapshot_version is not None
                and time.monotonic() - self.last_write_at >= min_interval_s)

    # ------------------------------------------------------------------ writes
    def capture(self, kind: WriteKind) -> Capture:
        """Start a write of the current state (call between two events of the model)."""
        assert self.writing is None, "one durability write per model at a time"
        capture = Capture(kind, DurablePoint(self.applied_seq, self.max_offset, self.unsequenced_offset),
                          self.hold, self.dirty_since, self.steps, self.forced,
                          time.monotonic())
        self.hold = None
        if kind == "snapshot":
            self.dirty_since, self.steps, self.forced = None, 0, False
        self.writing = capture
        return capture

    def written(self, capture: Capture, snapshot_version: str | None) -> None:
        self.point = capture.point
        now = time.monotonic()
        if capture.kind == "snapshot":
            self.snapshot_version = snapshot_version
            self.last_snapshot_s, self.last_snapshot_done = now - capture.started_at, now
        self.writing = None
        self.last_write_at = now

    def failed(self, capture: Capture) -> None:
        """The write did not happen: owe again what it would have settled."""
        self.hold = _min(self.hold, capture.hold)
        if capture.kind == "snapshot":
            self.dirty_since = _min(self.dirty_since, capture.dirty_since)
            self.steps += capture.steps
            self.forced = self.forced or capture.forced
        self.writing = None
        self.last_write_at = time.monotonic()  # retried after the marker / snapshot interval, not in a hot loop
