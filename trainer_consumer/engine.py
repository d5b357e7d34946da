"""The trainer's engine core: routes training events to per-model streams and applies them.

Per model (never across models):
- ORDER: events are applied strictly in seq_id order. Early arrivals wait in a reorder buffer (the SDK posts
  chunk 1 of a chunked forward_backward last); `seq_void` events consume a seq_id; a seq_id still missing
  `gap_timeout_s` after a later one arrived is declared void, logged, and poisons the gradient window (see
  ops_training.py for the window-failure rule). Events without seq_id apply in arrival order.
- IDEMPOTENCY: a duplicate (model_id, seq_id) is never applied twice. It is answered with the first reply
  (re-published as is, plus a copy under the duplicate's request_id if that differs), right away if the first is
  done, else as soon as it is. Duplicates of seq_ids too old for the result cache get a clear error.
- Each model drains its ready events in its own asyncio task, so a model waiting on a gap or on S3 never holds up
  another; backend calls of all models share one compute thread (runtime.py).

- RECOVERY (docs/recovery.md): a model met for the first time is restored from its snapshot (if any) before its
  events are accepted; re-read events the snapshot covers are finished silently. Each model is snapshotted at
  clean gradient windows (after create / load / unload at once, then every N optimizer steps or T seconds), in
  the background, and `holds()` tells the worker which offsets it must not commit yet (durability.py).
  `release()` / `drop()` hand a partition's models over on a rebalance.

The engine knows nothing of Kafka: the worker feeds it `Inbound`s and passes a sink that publishes replies. The
sink is awaited exactly once per Inbound (with no replies for seq_void), which is when its offset may be committed
(as far as `holds()` allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import msgspec

from artifact_store import Checkpoint
from bus_events import Envelope, EventType, make_event, make_result, new_id
from bus_events import payloads as p
from trainer_consumer import ops_checkpoints, ops_training
from trainer_consumer.durability import Capture, Durability
from trainer_consumer.errors import USER_ERRORS, TrainerError, UserError, error_info
from trainer_consumer.model_state import ModelState, WindowFailure, lasting_key
from trainer_consumer.runtime import Runtime
from trainer_consumer.sequencer import Sequencer
from trainer_consumer.snapshots import Snapshot, SnapshotStore
from trainer_consumer.stream import Inbound, ModelStream, Reply

log = logging.getLogger(__name__)

Sink = Callable[[Inbound, list[Reply]], Awaitable[None]]
Handler = Callable[[Runtime, ModelStream, Inbound], Awaitable[msgspec.Struct]]

HANDLERS: dict[EventType, Handler] = {
    EventType.CREATE_MODEL: ops_training.create_model,
    EventType.GET_INFO: ops_training.get_info,
    EventType.FORWARD_BACKWARD: ops_training.forward_backward,
    EventType.OPTIM_STEP: ops_training.optim_step,
    EventType.UNLOAD_MODEL: ops_training.unload_model,
    EventType.LOAD_WEIGHTS: ops_checkpoints.load_weights,
    EventType.SAVE_WEIGHTS: ops_checkpoints.save_weights,
    EventType.SAVE_WEIGHTS_FOR_SAMPLER: ops_checkpoints.save_weights_for_sampler,
}


NEW_STATE_EVENTS = frozenset({EventType.CREATE_MODEL, EventType.LOAD_WEIGHTS, EventType.UNLOAD_MODEL})
RESTORE_ATTEMPTS = 5  # reading a snapshot: transient S3 errors are retried with backoff, then the engine fails
Partition = tuple[str, int]


def replies_for_duplicate(first: Reply, duplicate: Envelope) -> list[Reply]:
    """The first reply again, and under the duplicate's own request_id when that differs."""
    replies = [first]
    if duplicate.request_id != first[0].request_id:
        body = first[1]
        replies.append(make_result(duplicate, body.result, body.error))
    return replies


class TrainerEngine:
    """`restore`: rebuild models from their snapshots when first met. `persist`: write snapshots (the live
    trainer does both; a replay of the log restores at most, and never writes)."""

    def __init__(self, runtime: Runtime, sink: Sink, *, snapshots: SnapshotStore | None = None,
                 restore: bool = True, persist: bool = True):
        self.runtime = runtime
        self.sink = sink
        self.snapshots = snapshots or SnapshotStore(runtime.storage.checkpoints.objects)
        self.restore = restore
        self.persist = persist
        self.streams: dict[str, ModelStream] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="trainer-gap-timer")

    async def stop(self) -> None:
        """Cancel everything at once (a graceful stop calls `release()` first)."""
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.runtime.close()

    # ------------------------------------------------------------------ intake
    def _stream(self, model_id: str) -> ModelStream:
        stream = self.streams.get(model_id)
        if stream is None:
            stream = ModelStream(model_id, Sequencer(self.runtime.config.gap_timeout_s),
                                 self.runtime.config.dedupe_results_per_model)
            self.streams[model_id] = stream
        return stream

    async def submit(self, inbound: Inbound) -> None:
        model_id = inbound.env.model_id
        stream = self.streams.get(model_id)
        if stream is None:
            stream = self._stream(model_id)
            if self.restore:
                stream.restoring = True
                stream.task = self._spawn(self._restore(stream), f"trainer-restore-{model_id}")
        stream.note_position(inbound.position)
        if stream.restoring:
            inbound.scheduled = True  # waits like a scheduled event (the worker's backpressure counts it)
            stream.held.append(inbound)
            return
        await self._accept(stream, inbound)

    async def _finish(self, stream: ModelStream, inbound: Inbound, replies: list[Reply], *, applied: bool) -> None:
        """Sink the event, then count it as owed until the model's next snapshot or marker captures it."""
        await self.sink(inbound, replies)
        position = inbound.position
        stream.durability.finished(inbound.env.seq_id, position.offset if position else None, applied=applied,
                                   holds=stream.state is not None)

    async def _accept(self, stream: ModelStream, inbound: Inbound) -> None:
        env = inbound.env
        if stream.covered is not None and inbound.position is not None \
                and stream.covered.covers(env.seq_id, inbound.position.offset):
            await self.sink(inbound, [])  # applied and answered before the restore: nothing to do, nothing owed
            return
        is_void = env.type == EventType.SEQ_VOID
        if env.seq_id is None:
            if is_void:
                log.warning("seq_void without seq_id for %s ignored", env.model_id)
                await self._finish(stream, inbound, [], applied=False)
                return
            stream.enqueue([inbound])
            self._schedule(stream)
            return
        seq_id = env.seq_id
        if seq_id in stream.results or seq_id in stream.pending:
            if is_void:  # the event itself got here: it wins over a void for its seq_id
                log.warning("seq_void for seq %d of %s ignored: that event arrived", seq_id, env.model_id)
                await self._finish(stream, inbound, [], applied=False)
            elif seq_id in stream.results:
                await self._finish(stream, inbound, replies_for_duplicate(stream.results[seq_id], env),
                                   applied=False)
            else:
                log.info("duplicate %s seq %d of %s waits for the first one", env.type, seq_id, env.model_id)
                stream.pending[seq_id].append(inbound)
            return
        released = stream.sequencer.offer(seq_id, inbound)
        if released is None:
            if is_void:
                await self._finish(stream, inbound, [], applied=False)
            else:
                await self._answer_stale(stream, inbound)
            return
        if is_void:
            reason = getattr(inbound.payload, "reason", "") or "rejected before reaching the trainer"
            stream.remember_void(seq_id, f"seq_id {seq_id} was voided: {reason}", "user")
        stream.pending[seq_id] = []
        stream.enqueue(released)
        self._schedule(stream)

    def _stale_message(self, stream: ModelStream, env: Envelope) -> str:
        void = stream.void_reasons.get(env.seq_id)  # type: ignore[arg-type]
        if void is not None:
            return f"{void[0]}; this late {env.type.value} was not applied"
        return (f"seq_id {env.seq_id} of model {env.model_id} was already applied and its result is no longer "
                f"cached (the last {self.runtime.config.dedupe_results_per_model} are); it was not applied again")

    async def _answer_stale(self, stream: ModelStream, inbound: Inbound) -> None:
        message = self._stale_message(stream, inbound.env)
        log.warning("stale event: %s", message)
        await self._finish(stream, inbound, [make_result(inbound.env, error=p.ErrorInfo(message=message,
                                                                                      category="user"))],
                           applied=False)

    # ------------------------------------------------------------------ gap timeouts
    async def _tick_forever(self) -> None:
        config = self.runtime.config
        period = min(1.0, max(0.01, config.gap_timeout_s / 4), max(0.05, config.marker_interval_s / 2))
        while True:
            await asyncio.sleep(period)
            self.expire_gaps()
            self.maintain()

    def expire_gaps(self) -> None:
        """Void seq_ids missing for longer than the gap timeout; the voids take their place in the order."""
        timeout = self.runtime.config.gap_timeout_s
        for stream in self.streams.values():
            missing, released = stream.sequencer.expire()
            if not missing:
                continue
            log.error("model %s: seq_id(s) %s never arrived within %.1f s; declared void, %d waiting event(s) go on",
                      stream.model_id, missing, timeout, len(released))
            voids = []
            for seq_id in missing:
                stream.remember_void(seq_id, f"seq_id {seq_id} never arrived within the {timeout:g} s gap timeout "
                                             "and was declared void", "server")
                env, payload = make_event(EventType.SEQ_VOID, p.SeqVoid(reason="gap timeout"),
                                          model_id=stream.model_id, seq_id=seq_id, request_id=new_id("gap"))
                voids.append(Inbound(env, payload))
            stream.enqueue([*voids, *released])
            self._schedule(stream)

    # ------------------------------------------------------------------ apply
    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule(self, stream: ModelStream, maintenance: bool = False) -> None:
        if stream.running or stream.restoring or stream.stopping or not (stream.ready or maintenance):
            return
        stream.running = True
        stream.task = self._spawn(self._drain(stream), f"trainer-model-{stream.model_id}")

    async def _drain(self, stream: ModelStream) -> None:
        try:
            while not stream.stopping:
                if stream.ready:
                    inbound = stream.ready.popleft()
                    if inbound.env.type == EventType.SEQ_VOID:
                        await self._apply_void(stream, inbound)
                    else:
                        await self._apply(stream, inbound)
                await self._persist_if_due(stream)
                if not stream.ready:
                    break
        except Exception as exc:  # the sink failed (Kafka down...): the worker must stop, not lose replies
            log.exception("model %s stopped", stream.model_id)
            self.failure = exc
        finally:
            stream.running = False

    async def _apply_void(self, stream: ModelStream, inbound: Inbound) -> None:
        seq_id = inbound.env.seq_id
        assert seq_id is not None
        reason, category = stream.void_reasons.get(seq_id, (f"seq_id {seq_id} was voided", "user"))
        voided_type = inbound.voided_type or getattr(inbound.payload, "request_type", None)
        before = lasting_key(stream.state)
        if stream.state is not None and voided_type in (None, "", EventType.FORWARD_BACKWARD.value):
            stream.state.poison_window(WindowFailure(f"seq_id {seq_id}", reason, category))
        if stream.state is not None:
            stream.state.last_applied_seq_id = seq_id
            if lasting_key(stream.state) != before:
                stream.durability.lasting_effect()
        waiting = stream.pending.pop(seq_id, [])
        await self._finish(stream, inbound, [], applied=True)
        for late in waiting:
            await self._answer_stale(stream, late)

    async def _apply(self, stream: ModelStream, inbound: Inbound) -> None:
        env = inbound.env
        result: msgspec.Struct | None = None
        error: p.ErrorInfo | None = None
        before = lasting_key(stream.state)
        try:
            handler = HANDLERS.get(env.type)
            if handler is None:
                raise UserError(f"{env.type.value} is not a training request")
            result = await handler(self.runtime, stream, inbound)
        except Exception as exc:
            error = error_info(exc)
            expected = isinstance(exc, (TrainerError, *USER_ERRORS))
            log.log(logging.INFO if error.category == "user" else logging.ERROR, "%s seq %s of %s failed: %s",
                    env.type.value, env.seq_id, env.model_id, error.message, exc_info=not expected)
        reply = make_result(env, result, error)
        if stream.state is not None and env.seq_id is not None:
            stream.state.last_applied_seq_id = env.seq_id
        if stream.state is not None and lasting_key(stream.state) != before:
            stream.durability.lasting_effect(optim_step=env.type == EventType.OPTIM_STEP and error is None,
                                             new_state=env.type in NEW_STATE_EVENTS)
        duplicates = stream.remember(env.seq_id, reply) if env.seq_id is not None else []
        await self._finish(stream, inbound, [reply], applied=True)
        for duplicate in duplicates:
            await self._finish(stream, duplicate, replies_for_duplicate(reply, duplicate.env), applied=False)

    # ------------------------------------------------------------------ restore
    async def _restore(self, stream: ModelStream) -> None:
        try:
            snapshot = await self._read_snapshot(stream.model_id)
            if snapshot is not None:
                await self._install(stream, snapshot)
            # Still "restoring" while the held events go in, so later arrivals queue behind them (seq-less events
            # apply in arrival order).
            while stream.held:
                inbound = stream.held.pop(0)
                inbound.scheduled = False  # as if it arrived now: one waiting for a gap does not count as busy
                await self._accept(stream, inbound)
            stream.restoring = False
            self._schedule(stream)
        except Exception as exc:  # S3 unreadable for good, or the sink failed: the worker must stop
            log.exception("model %s could not be restored", stream.model_id)
            self.failure = exc

    async def _read_snapshot(self, model_id: str) -> Snapshot | None:
        for attempt in range(RESTORE_ATTEMPTS):
            try:
                return await self.runtime.io(self.snapshots.load, model_id)
            except Exception as exc:
                if attempt == RESTORE_ATTEMPTS - 1:
                    raise
                delay = 0.5 * 2 ** attempt
                log.warning("reading the snapshot of %s failed (%s); retrying in %.1f s", model_id, exc, delay)
                await asyncio.sleep(delay)
        return None

    async def _install(self, stream: ModelStream, snapshot: Snapshot) -> None:
        state = ModelState.from_checkpoint_state(snapshot.state)
        point = snapshot.point
        if not state.unloaded:
            try:
                self.runtime.check_base_model(state.base_model)
            except UserError as exc:
                stream.unavailable = f"model {stream.model_id} cannot be restored on this trainer: {exc}"
                log.error("%s", stream.unavailable)
                return
            ckpt = snapshot.checkpoint
            await self.runtime.compute(_install_adapter, self.runtime, state, ckpt)
        state.last_applied_seq_id = point.last_seq
        stream.state = state
        if point.last_seq is not None:
            stream.sequencer.next_seq = point.last_seq + 1
        stream.covered = point
        stream.durability = Durability.restored(point, snapshot.version)
        log.info("restored model %s from its snapshot: step %d, seq_id %s, log offset %s", stream.model_id,
                 state.step, point.last_seq, point.max_offset)

    # ------------------------------------------------------------------ snapshots and progress markers
    def _snapshot_due(self, stream: ModelStream) -> bool:
        state, config = stream.state, self.runtime.config
        return state is not None and (state.unloaded or state.window_clean) and \
            stream.durability.snapshot_due(config.snapshot_every_steps, config.snapshot_interval_s)

    def _marker_due(self, stream: ModelStream) -> bool:
        return stream.state is not None and stream.durability.marker_due(self.runtime.config.marker_interval_s)

    async def _persist_if_due(self, stream: ModelStream) -> None:
        if not self.persist or stream.stopping:
            return
        if self._snapshot_due(stream):
            await self._start_snapshot(stream)
        elif self._marker_due(stream):  # at most every marker_interval_s
            self._start_marker(stream)

    async def _start_snapshot(self, stream: ModelStream) -> None:
        """Capture the model between two of its events; the upload goes on in the background."""
        state = stream.state
        assert state is not None
        record = state.checkpoint_state(None, None)
        capture = stream.durability.capture("snapshot")
        try:
            if state.unloaded:  # a tombstone: nothing left to hold but the record
                config, weights, optimizer = {}, {}, {}
            else:
                adapter, optimizer = await self.runtime.compute(ops_checkpoints.training_state, self.runtime.backend,
                                                                state.model_id)
                config, weights = adapter.config, adapter.weights
        except BaseException:
            stream.durability.failed(capture)
            raise
        checkpoint = Checkpoint(config, weights, optimizer, record)
        write = functools.partial(self.snapshots.save, state.model_id, checkpoint, capture.point, state.base_model)
        stream.writer = self._spawn(self._write(stream, capture, write), f"trainer-snapshot-{state.model_id}")

    def _start_marker(self, stream: ModelStream) -> None:
        durability = stream.durability
        version = durability.snapshot_version
        assert version is not None
        capture = durability.capture("marker")
        write = functools.partial(self.snapshots.save_progress, stream.model_id, version, capture.point)
        stream.writer = self._spawn(self._write(stream, capture, write), f"trainer-marker-{stream.model_id}")

    async def _write(self, stream: ModelStream, capture: Capture, write: Callable[[], str | None]) -> None:
        try:
            version = await self.runtime.io(write)
        except Exception as exc:
            log.warning("%s of model %s failed (%s); its offsets stay uncommitted until a later one succeeds",
                        capture.kind, stream.model_id, exc)
            stream.durability.failed(capture)
        else:
            stream.durability.written(capture, version)
            log.debug("%s of %s written: seq_id %s, offset %s", capture.kind, stream.model_id,
                      capture.point.last_seq, capture.point.max_offset)
        finally:
            stream.writer = None

    def maintain(self) -> None:
        """Snapshots and markers that fell due while a model was idle (time-based, or after a failed write)."""
        if not self.persist:
            return
        for stream in self.streams.values():
            if stream.running or stream.restoring or stream.stopping:
                continue
            if self._snapshot_due(stream) or self._marker_due(stream):
                self._schedule(stream, maintenance=True)

    def holds(self) -> dict[Partition, int]:
        """Per partition, the lowest offset some model still needs re-read after a crash."""
        out: dict[Partition, int] = {}
        for stream in self.streams.values():
            hold = stream.durability.effective_hold()
            if hold is not None and stream.partition is not None:
                out[stream.partition] = min(hold, out.get(stream.partition, hold))
        return out

    # ------------------------------------------------------------------ handing partitions over
    async def release(self, partitions: set[Partition] | None = None) -> None:
        """Stop applying events of the models on `partitions` (None: all), let running steps finish (up to
        release_timeout_s), and snapshot what can be: the next owner then replays as little as possible. Their
        holds stay until `drop()`, so the commit that follows is exact."""
        timeout = self.runtime.config.release_timeout_s
        streams = [s for s in self.streams.values() if partitions is None or s.partition in partitions]
        for stream in streams:
            stream.stopping = True
        busy = {s.task: s for s in streams if s.task is not None and not s.task.done()}
        abandoned: set[str] = set()
        if busy:
            _, late = await asyncio.wait(busy, timeout=timeout)
            for task in late:  # a step longer than the timeout: abandon it (its event stays uncommitted)
                task.cancel()
                abandoned.add(busy[task].model_id)  # its state may be half-updated: never snapshot it
            await asyncio.gather(*late, return_exceptions=True)
        if self.persist:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for stream in streams:
                        if stream.model_id not in abandoned:
                            await self._final_persist(stream)
        writers = [s.writer for s in streams if s.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=timeout)

    async def _final_persist(self, stream: ModelStream) -> None:
        state, durability = stream.state, stream.durability
        if state is None or stream.restoring or stream.running or durability.writing is not None:
            return
        if durability.dirty and (state.unloaded or state.window_clean):
            await self._start_snapshot(stream)
        elif not durability.dirty and durability.hold is not None and durability.snapshot_version is not None:
            self._start_marker(stream)

    async def drop(self, partitions: set[Partition] | None = None) -> None:
        """Forget the models on `partitions` (after `release()` and the commit): their next owner restores them."""
        for model_id, stream in list(self.streams.items()):
            if partitions is not None and stream.partition not in partitions:
                continue
            for task in (stream.task, stream.writer):
                if task is not None and not task.done():
                    task.cancel()
            del self.streams[model_id]
            # No-op for a model without adapter; queued behind any step of it still on the compute thread.
            await self.runtime.compute(self.runtime.backend.remove_adapter, model_id)
        log.info("released models on %s", "all partitions" if partitions is None else sorted(partitions))


def _install_adapter(rt: Runtime, state: ModelState, checkpoint: Checkpoint) -> None:
    """Create the model's adapter and load a snapshot into it (weights and AdamW moments); all or nothing."""
    rt.backend.create_adapter(state.model_id, state.spec)
    try:
        rt.backend.load_adapter(state.model_id, checkpoint.adapter_weights, checkpoint.optimizer_state or {})
    except BaseException:
        rt.backend.remove_adapter(state.model_id)
        raise
