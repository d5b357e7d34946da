"""Rebuild one model from the event log, through the live trainer's own code path, and report how it went.

The records (from the broker or an export file, event_log.py) go through the worker's decoding (intake.py) into
a TrainerEngine with the configured backend: the same ordering, dedupe, window rule and op handlers as live.
What differs is only around it:

- Storage is a MemoryObjectStore reading through to the live bucket: checkpoints the run loads are read from
  S3, but everything the replay writes (its saves, run records, sampling sessions) stays in
  memory; nothing live changes.
- No snapshots are written; with `from_snapshot` the model starts from its live auto-snapshot (restore path of
  the engine) and only the events after it are applied.
- Identity: with tenant keys (TINKER_BUS_EVENT_KEYS) every event must be signed by its tenant, checked by the
  live trainer's SignatureCheck on the record's bytes and headers as they were on the bus; a forged or unsigned
  event is skipped without voiding anything (`unverified` in the report), as the live trainer dead-letters it.
  With the reply key, live replies not signed with it are not compared.
- Gaps: nothing is voided while records still come (a late seq_id may follow in the log); at the end of the log
  the remaining gaps are voided at once, as the live gap timeout would have.

The report (report.json beside the adapter) lists every applied event with its metrics, one entry per optimizer
step (the window's summed loss and the step's metrics), every checkpoint the run saved with the sha256
(fingerprint.adapter_sha256) of the replayed weights beside the live checkpoint's, and, when the log's replies
are at hand, whether each replayed result equals the live one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from artifact_store import Checkpoint, CheckpointStore, MemoryObjectStore, ObjectStore, TinkerPath
from bus_events import EventType, Reply, decode_envelope, decode_payload
from bus_events import payloads as p
from bus_events.results import outcome
from bus_events.signing import TenantKeys
from bus_runtime.log_reader import LogRecord
from bus_runtime.records import ReplyCheck, SignatureCheck, UnverifiedEvent
from trainer_consumer.backends import make_backend
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.config import TrainerConfig
from trainer_consumer.engine import TrainerEngine
from trainer_consumer.inbound import BusPosition, Inbound
from trainer_consumer.intake import Poisoned, decode_training_record
from trainer_consumer.replay.event_log import RecordBlobs
from trainer_consumer.replay.fingerprint import adapter_sha256
from trainer_consumer.replay.report import (
    EventEntry,
    FinalState,
    ReplayReport,
    SnapshotStart,
    compare_checkpoints,
    compare_live,
    live_snapshot,
    steps_of,
)
from trainer_consumer.runtime import Runtime, Storage
from trainer_consumer.snapshots import SnapshotStore

log = logging.getLogger(__name__)

NO_GAP_TIMEOUT_S = 1e9
SAVES = (EventType.SAVE_WEIGHTS, EventType.SAVE_WEIGHTS_FOR_SAMPLER, EventType.SAVE_WEIGHTS_EXTERNAL)
OUTPUT_NAME = "replay-output"

AppliedProgress = Callable[[int, int], None]  # (events applied, optimizer steps applied)


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReplayRequest:
    model_id: str
    out_dir: Path
    train_topic: str
    replies_topic: str | None = None  # where the live replies are, to compare results
    until_seq: int | None = None
    from_snapshot: bool = False


class _Recorder:
    """The engine's sink during a replay: records what each event did, in the order the model applied them."""

    def __init__(self, model_id: str, sandbox: CheckpointStore, on_applied: AppliedProgress | None):
        self.model_id = model_id
        self.sandbox = sandbox
        self.on_applied = on_applied
        self.engine: TrainerEngine | None = None
        self.events: list[EventEntry] = []
        self.results: dict[str, Any] = {}  # request_id -> replayed Result (builtins)
        self.seen_seqs: set[int] = set()
        self.fed: set[int] = set()
        self.finished: set[int] = set()
        self.steps = 0
        self.changed = asyncio.Event()

    async def __call__(self, inbound: Inbound, replies: list[Reply]) -> None:
        try:
            await self._record(inbound, replies)
        finally:
            # Only once its entry is in (a save's entry awaits the sandbox): wait_done must not return before.
            self.finished.add(id(inbound))
            self.changed.set()

    async def _record(self, inbound: Inbound, replies: list[Reply]) -> None:
        env = inbound.env
        first_time = env.seq_id is None or env.seq_id not in self.seen_seqs
        if env.seq_id is not None:
            self.seen_seqs.add(env.seq_id)
        own = next((result for reply_env, result in replies if reply_env.request_id == env.request_id), None)
        if not first_time or (own is None and env.type != EventType.SEQ_VOID):
            return  # a duplicate, or a re-read the restored snapshot covers
        assert self.engine is not None
        state = self.engine.model_state(self.model_id)
        entry = EventEntry(seq_id=env.seq_id, type=env.type.value, request_id=env.request_id,
                           step=state.step if state is not None else None)
        if own is not None:
            self.results[env.request_id] = outcome(own)
            entry.ok = own.error is None
            if own.error is not None:
                entry.error = own.error.message
            elif env.type in (EventType.FORWARD_BACKWARD, EventType.OPTIM_STEP):
                entry.metrics = dict((own.result or {}).get("metrics", {}))
            if env.type == EventType.FORWARD_BACKWARD:
                entry.forward_only = bool(getattr(inbound.payload, "forward_only", False))
            if env.type in SAVES and own.error is None:
                entry.path = path = str((own.result or {})["path"])
                weights = (await asyncio.to_thread(self.sandbox.load, TinkerPath.parse(path))).adapter_weights
                entry.sha256 = adapter_sha256(weights)
            if env.type == EventType.OPTIM_STEP and own.error is None:
                self.steps += 1
        self.events.append(entry)
        if self.on_applied is not None:
            self.on_applied(len(self.events), self.steps)

    async def wait_done(self, failure: Callable[[], BaseException | None]) -> None:
        while not self.fed <= self.finished:
            if failure() is not None:
                raise ReplayError("the engine failed during the replay") from failure()
            self.changed.clear()
            try:
                async with asyncio.timeout(1.0):
                    await self.changed.wait()
            except TimeoutError:
                pass


async def replay_model(records: AsyncIterator[LogRecord], request: ReplayRequest, *, live: ObjectStore | None,
                       config: TrainerConfig | None = None, device: str = "auto",
                       backend: TrainingBackend | None = None, on_applied: AppliedProgress | None = None,
                       source: dict[str, Any] | None = None, tenant_keys: TenantKeys | None = None,
                       reply_key: bytes | None = None) -> dict[str, Any]:
    """Replay `request.model_id` from `records`; write its adapter and report.json into `request.out_dir`.
    Returns the report as JSON builtins (what report.json holds; `ReplayReport` is its typed form)."""
    started = time.monotonic()
    model_id = request.model_id
    if request.from_snapshot and live is None:
        raise ReplayError("--from-snapshot needs the live bucket (the snapshot is in S3)")
    config = replace(config or TrainerConfig(), gap_timeout_s=NO_GAP_TIMEOUT_S)
    sandbox_objects = MemoryObjectStore(base=live, private=(f"runs/{model_id}/",))
    sandbox = CheckpointStore(sandbox_objects)
    runtime = Runtime(backend or make_backend(config, device), Storage.on(sandbox_objects), config, None)
    recorder = _Recorder(model_id, sandbox, on_applied)
    engine = TrainerEngine(runtime, recorder, snapshots=SnapshotStore(live) if live is not None else None,
                           restore=request.from_snapshot, persist=False)
    recorder.engine = engine
    live_results: dict[str, Any] = {}
    counts = {"records_read": 0, "events_fed": 0, "poisoned": 0, "unverified": 0, "beyond_until_seq": 0}
    engine.start()
    try:
        async for record in records:
            counts["records_read"] += 1
            if request.replies_topic is not None and record.topic == request.replies_topic:
                _collect_live_result(record, live, live_results, reply_key)
                continue
            if record.topic != request.train_topic or record.key != model_id.encode():
                continue
            verify = SignatureCheck(tenant_keys, record.value, record.headers) if tenant_keys else None
            decoded = await decode_training_record(record.value, BusPosition(record.topic, record.partition,
                                                                              record.offset),
                                                   RecordBlobs(record, live), verify)
            if isinstance(decoded, Poisoned):
                counts["poisoned"] += 1
                if isinstance(decoded.error, UnverifiedEvent):
                    counts["unverified"] += 1
                    log.warning("replay skips %s[%d]@%d: %s", record.topic, record.partition, record.offset,
                                decoded.error)
                if decoded.void is None:
                    continue
                decoded = decoded.void
            seq = decoded.env.seq_id
            if request.until_seq is not None and seq is not None and seq > request.until_seq:
                counts["beyond_until_seq"] += 1
                continue
            recorder.fed.add(id(decoded))
            counts["events_fed"] += 1
            await engine.submit(decoded)
        await engine.end_of_log()  # what is still missing never comes
        await recorder.wait_done(lambda: engine.failure)
        state = engine.model_state(model_id)
        if state is None:
            raise ReplayError(f"model {model_id} was never created in this log"
                              + (" (and has no snapshot)" if request.from_snapshot else ""))
        covered = engine.restored_point(model_id)
        if covered is not None and request.until_seq is not None and (covered.last_seq or 0) > request.until_seq:
            raise ReplayError(f"the snapshot already holds seq_id {covered.last_seq}, past --until-seq "
                              f"{request.until_seq}: replay from scratch instead")
        final = FinalState(step=state.step, last_seq_id=state.last_applied_seq_id, unloaded=state.unloaded)
        request.out_dir.mkdir(parents=True, exist_ok=True)
        if not state.unloaded:
            adapter = await runtime.compute(runtime.backend.export_adapter, model_id)
            output = TinkerPath(model_id, "sampler_weights", OUTPUT_NAME)
            await asyncio.to_thread(sandbox.save, output, Checkpoint(adapter.config, adapter.weights),
                                    base_model=state.base_model, overwrite=True)
            await asyncio.to_thread(sandbox.download, output, request.out_dir)
            final.sha256 = adapter_sha256(adapter.weights)
            final.adapter_dir = str(request.out_dir)
    finally:
        await engine.stop()
    checkpoints = await asyncio.to_thread(compare_checkpoints, recorder.events, live)
    snapshot = await asyncio.to_thread(live_snapshot, live, model_id)
    final.live = [c for c in checkpoints if c.step == final.step and c.live_sha256]
    if snapshot is not None and snapshot.step == final.step and isinstance(final.sha256, str):
        final.live.append(msgspec.structs.replace(snapshot, match=snapshot.sha256 == final.sha256))
    report = ReplayReport(
        model_id=model_id,
        base_model=state.base_model,
        source=source or {},
        until_seq=request.until_seq,
        from_snapshot=SnapshotStart(seq_id=covered.last_seq, offset=covered.max_offset) if covered else None,
        **counts,
        events_applied=len(recorder.events),
        steps_applied=recorder.steps,
        seconds=round(time.monotonic() - started, 3),
        final=final,
        steps=steps_of(recorder.events),
        checkpoints=checkpoints,
        live_snapshot=snapshot,
        live_replies=compare_live(recorder.results, live_results) if request.replies_topic else None,
        events=recorder.events,
    )
    (request.out_dir / "report.json").write_text(report.dump())
    return report.to_json()


def _collect_live_result(record: LogRecord, live: ObjectStore | None, into: dict[str, Any],
                         reply_key: bytes | None) -> None:
    try:
        env = decode_envelope(record.value)
        if env.type != EventType.RESULT or env.request_id in into:
            return  # a result re-published after a crash or for a duplicate: the first one counts
        ReplyCheck(reply_key, record.value, record.headers)(env)
        payload = decode_payload(env, RecordBlobs(record, live))
        assert isinstance(payload, p.Result)
        into[env.request_id] = outcome(payload)
    except Exception as exc:
        log.debug("live reply at %s[%d]@%d unreadable: %s", record.topic, record.partition, record.offset, exc)
