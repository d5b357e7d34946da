"""report.json of a replay, as structs: what each event did, one entry per optimizer step, each save beside the
live checkpoint at its path, and (when the log's replies are at hand) whether the replayed results equal the
live ones. Optional entries are UNSET (left out of the JSON) where the run had nothing to say."""

from __future__ import annotations

import json
import logging
from typing import Any

import msgspec

from artifact_store import CheckpointStore, ObjectStore, TinkerPath
from bus_events import EventType
from trainer_consumer.replay.fingerprint import adapter_sha256
from trainer_consumer.snapshots import SnapshotStore, snapshot_path

log = logging.getLogger(__name__)

UNSET = msgspec.UNSET
Unset = msgspec.UnsetType
Metrics = dict[str, float]


class _Entry(msgspec.Struct, kw_only=True):
    pass


class EventEntry(_Entry):
    """One event the model applied (a duplicate or a covered re-read is not one)."""

    seq_id: int | None
    type: str
    request_id: str
    step: int | None  # the model's optimizer step after it
    ok: bool | Unset = UNSET  # UNSET: no reply of its own (a seq_void)
    error: str | Unset = UNSET
    metrics: Metrics | Unset = UNSET
    forward_only: bool | Unset = UNSET
    path: str | Unset = UNSET  # saves: where, and the sha256 of the replayed weights
    sha256: str | Unset = UNSET


class StepEntry(_Entry):
    step: int | None
    seq_id: int | None
    ok: bool
    loss_sum: float = msgspec.field(name="loss:sum")  # the window's forward_backwards, summed
    forward_backward: list[dict[str, Any]]
    optim: Metrics
    error: str | Unset = UNSET


class CheckpointEntry(_Entry):
    """A save of the replay beside the live checkpoint at its path."""

    path: str
    seq_id: int | None
    step: int | None
    sha256: str
    live_sha256: str | Unset | None = UNSET
    match: bool | None = None  # None: not compared (live_missing says why)
    live_missing: str | Unset = UNSET


class LiveSnapshot(_Entry):
    path: str
    step: int
    seq_id: int | None
    sha256: str
    match: bool | Unset = UNSET


class FinalState(_Entry):
    step: int
    last_seq_id: int | None
    unloaded: bool
    sha256: str | Unset = UNSET
    adapter_dir: str | Unset = UNSET
    live: list[CheckpointEntry | LiveSnapshot] = msgspec.field(default_factory=list)


class SnapshotStart(_Entry):
    seq_id: int | None
    offset: int | None


class LiveReplies(_Entry):
    compared: int
    identical: int
    differing: list[str]
    without_live_reply: int


class ReplayReport(_Entry):
    model_id: str
    base_model: str
    source: dict[str, Any]
    until_seq: int | None
    from_snapshot: SnapshotStart | None
    records_read: int
    events_fed: int
    poisoned: int
    unverified: int  # of the poisoned: not signed by their tenant (skipped, as the live trainer dead-letters them)
    beyond_until_seq: int
    events_applied: int
    steps_applied: int
    seconds: float
    final: FinalState
    steps: list[StepEntry]
    checkpoints: list[CheckpointEntry]
    live_snapshot: LiveSnapshot | None
    live_replies: LiveReplies | None
    events: list[EventEntry]

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self, builtin_types=(bytes,))

    def dump(self) -> str:
        return json.dumps(self.to_json(), indent=1, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))


def steps_of(events: list[EventEntry]) -> list[StepEntry]:
    """One entry per optimizer step: its gradient window's forward_backwards and summed loss, and its metrics."""
    out: list[StepEntry] = []
    window: list[EventEntry] = []
    for event in events:
        metrics = event.metrics if event.metrics is not UNSET else {}
        if event.type == EventType.FORWARD_BACKWARD.value and not event.forward_only:
            window.append(event)
        elif event.type == EventType.OPTIM_STEP.value:
            fbs: list[dict[str, Any]] = [{"seq_id": e.seq_id, **(e.metrics if e.metrics is not UNSET else {})}
                                         for e in window]
            out.append(StepEntry(step=event.step, seq_id=event.seq_id, ok=event.ok is True,
                                 loss_sum=sum(f.get("loss:sum", 0.0) for f in fbs), forward_backward=fbs,
                                 optim=metrics, error=event.error))
            window = []
        elif event.type == EventType.LOAD_WEIGHTS.value:
            window = []
    return out


def _live_sha(live: ObjectStore | None, path: TinkerPath) -> tuple[str | None, str | None]:
    """(sha256, why not) of a live checkpoint's adapter."""
    if live is None:
        return None, "offline"
    try:
        return adapter_sha256(CheckpointStore(live).load(path).adapter_weights), None
    except Exception as exc:  # gone (TTL), never written, S3 away
        return None, f"{type(exc).__name__}: {exc}"


def compare_checkpoints(events: list[EventEntry], live: ObjectStore | None) -> list[CheckpointEntry]:
    """Each save of the replay beside the live checkpoint at its path. A path saved again later (overwrite) only
    holds its last save live, so earlier ones are not compared."""
    saves = [e for e in events if e.sha256 is not UNSET and e.path is not UNSET]
    last = {e.path: e for e in saves}
    out = []
    for event in saves:
        assert isinstance(event.path, str) and isinstance(event.sha256, str)
        entry = CheckpointEntry(path=event.path, seq_id=event.seq_id, step=event.step, sha256=event.sha256)
        if last[event.path] is event:
            live_sha, why = _live_sha(live, TinkerPath.parse(event.path))
            entry.live_sha256 = live_sha
            entry.match = live_sha == event.sha256 if live_sha else None
            if why:
                entry.live_missing = why
        else:
            entry.live_missing = "saved again later at this path"
        out.append(entry)
    return out


def live_snapshot(live: ObjectStore | None, model_id: str) -> LiveSnapshot | None:
    if live is None:
        return None
    try:
        snapshot = SnapshotStore(live).load(model_id)
    except Exception as exc:
        log.warning("cannot read the live snapshot of %s: %s", model_id, exc)
        return None
    if snapshot is None or snapshot.record.unloaded:
        return None
    return LiveSnapshot(path=str(snapshot_path(model_id)), step=snapshot.record.step, seq_id=snapshot.point.last_seq,
                        sha256=adapter_sha256(snapshot.checkpoint.adapter_weights))


def compare_live(replayed: dict[str, Any], live: dict[str, Any]) -> LiveReplies:
    common = sorted(set(replayed) & set(live))
    differing = [r for r in common if replayed[r] != live[r]]
    return LiveReplies(compared=len(common), identical=len(common) - len(differing), differing=differing,
                       without_live_reply=len(set(replayed) - set(live)))
