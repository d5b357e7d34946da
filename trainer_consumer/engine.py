"""The trainer's engine: carries out what each model's scheduler (stream.py) decides. A loop per model lane:
accept -> apply -> finish.

- `submit(inbound)` asks the model's stream what to do (`accept`); answers go out at once, ready actions (Apply,
  Void) join the model's lane.
- A lane applies its ready actions one after the other in its own asyncio task, so a model waiting on a gap or on
  S3 never holds up another; backend calls of all models share one compute thread (runtime.py). After each event
  the recovery collaborator (recovery.py) may start a snapshot or a progress marker.
- `finish` sinks the replies, then reports the event to its stream (it is owed until a snapshot covers it).

The engine knows nothing of Kafka: the worker feeds it `Inbound`s and passes a sink that publishes replies. The
sink is awaited exactly once per Inbound (with no replies for seq_void), which is when its offset may be committed
(as far as `holds()` allows). `release()` / `drop()` hand a partition's models over on a rebalance; replay ends its
log with `end_of_log()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bus_events import Reply, make_result
from bus_events import payloads as p
from bus_events.ids import session_of_model
from bus_runtime.errors import ServiceError, UserError
from trainer_consumer.actions import Action, AnswerDuplicate, AnswerStale, Apply, Finish, Hold, Ready, Void
from trainer_consumer.durability import DurablePoint
from trainer_consumer.errors import USER_ERRORS, error_info
from trainer_consumer.inbound import Inbound
from trainer_consumer.model_state import ModelState, lasting_key
from trainer_consumer.ops import HANDLERS
from trainer_consumer.recovery import Partition, Recovery
from trainer_consumer.residency import SESSION_CHECK_S, Residency, durable, quiet
from trainer_consumer.runtime import Runtime
from trainer_consumer.sequencer import Sequencer
from trainer_consumer.snapshots import SnapshotStore
from trainer_consumer.stream import ModelStream, Phase

log = logging.getLogger(__name__)

Sink = Callable[[Inbound, list[Reply]], Awaitable[None]]


@dataclass(eq=False)
class _Lane:
    """Where one model's ready actions wait and run: the engine's side of a stream."""

    ready: deque[Ready] = field(default_factory=deque)
    current: Inbound | None = None  # the event being applied
    draining: bool = False
    task: asyncio.Task | None = None  # its drain, or its restore

    def scheduled(self) -> int:
        return len(self.ready) + (self.current is not None)


class TrainerEngine:
    """`restore`: rebuild models from their snapshots when first met. `persist`: write snapshots (the live
    trainer does both; a replay of the log restores at most, and never writes)."""

    def __init__(self, runtime: Runtime, sink: Sink, *, snapshots: SnapshotStore | None = None,
                 restore: bool = True, persist: bool = True):
        self.runtime = runtime
        self.sink = sink
        self.recovery = Recovery(runtime, snapshots or SnapshotStore(runtime.storage.checkpoints.objects),
                                 self._spawn, restore=restore, persist=persist)
        self.streams: dict[str, ModelStream] = {}
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.failure: BaseException | None = None
        # Why the gap timer / maintenance last failed (None: its last round was clean), and how often its task had
        # to be restarted: the worker's heartbeat reports both, so /healthz shows a trainer whose timers are sick.
        self.maintenance_error: str | None = None
        self.maintenance_restarts = 0
        config = runtime.config
        self.residency = Residency(config.idle_offload_s, config.max_resident_adapters, config.session_expiry_s)
        self._offloading: set[str] = set()
        self._sessions_checked = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="trainer-gap-timer")
        self._ticker.add_done_callback(self._ticker_ended)

    def _ticker_ended(self, task: asyncio.Task) -> None:
        """Supervision: gap timeouts and idle snapshots of every model depend on this task, so it never stays
        dead (a round that raises is already caught in `_tick_forever`; this covers what escapes it)."""
        if task.cancelled() or task is not self._ticker:
            return
        self.maintenance_restarts += 1
        self.maintenance_error = f"the gap-timer task died: {task.exception()!r}"
        log.error("%s; restarting it (restart %d)", self.maintenance_error, self.maintenance_restarts)
        self.start()

    async def stop(self) -> None:
        """Cancel everything at once (a graceful stop calls `release()` first), then close the backend."""
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.runtime.close(self.runtime.config.release_timeout_s)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ what others may read
    def model_state(self, model_id: str) -> ModelState | None:
        stream = self.streams.get(model_id)
        return stream.state if stream is not None else None

    def restored_point(self, model_id: str) -> DurablePoint | None:
        """Where the model's snapshot left it, if it was restored from one."""
        stream = self.streams.get(model_id)
        return stream.covered if stream is not None else None

    def scheduled(self) -> dict[Partition, int]:
        """Per partition, the events waiting for compute or in it (held for a restore included; events waiting
        for a missing seq_id or for their first copy are not: a pause must never wait on what it keeps out)."""
        out: dict[Partition, int] = {}
        for model_id, stream in self.streams.items():
            if stream.partition is not None:
                count = self._lanes[model_id].scheduled() + len(stream.held)
                out[stream.partition] = out.get(stream.partition, 0) + count
        return out

    def holds(self) -> dict[Partition, int]:
        """Per partition, the lowest offset some model still needs re-read after a crash."""
        return self.recovery.holds(self.streams.values())

    # ------------------------------------------------------------------ accept
    async def submit(self, inbound: Inbound) -> None:
        model_id = inbound.env.model_id
        stream = self.streams.get(model_id)
        if stream is None:
            stream = self._open(model_id)
        self.residency.touch(model_id)
        await self._carry_out(stream, stream.accept(inbound))

    def _open(self, model_id: str) -> ModelStream:
        config = self.runtime.config
        stream = ModelStream(model_id, Sequencer(config.gap_timeout_s), config.dedupe_results_per_model)
        lane = _Lane()
        self.streams[model_id] = stream
        self._lanes[model_id] = lane
        if self.recovery.restore:
            stream.begin_restore()
            lane.task = self._spawn(self._restore(stream), f"trainer-restore-{model_id}")
        return stream

    async def _restore(self, stream: ModelStream) -> None:
        try:
            await self.recovery.restore_model(stream)
            await self._carry_out(stream, stream.end_restore())
        except Exception as exc:  # S3 unreadable for good, or the sink failed: the worker must stop
            log.exception("model %s could not be restored", stream.model_id)
            self.failure = exc

    async def _carry_out(self, stream: ModelStream, actions: Iterable[Action]) -> None:
        """Answer what can be answered now; queue ready actions on the model's lane and start it."""
        lane = self._lanes[stream.model_id]
        for action in actions:
            if isinstance(action, (Apply, Void)):
                lane.ready.append(action)
            elif isinstance(action, AnswerDuplicate):
                await self._finish(stream, action.inbound, action.replies, applied=False)
            elif isinstance(action, AnswerStale):
                log.warning("stale event: %s", action.message)
                error = p.ErrorInfo(message=action.message, category="user")
                await self._finish(stream, action.inbound, [make_result(action.inbound.env, error=error)],
                                   applied=False)
            elif isinstance(action, Finish):
                if action.owed:
                    await self._finish(stream, action.inbound, [], applied=False)
                else:
                    await self.sink(action.inbound, [])  # covered by the restored snapshot: nothing owed
            else:
                assert isinstance(action, Hold)  # the stream keeps it until its restore ends
        self._schedule(stream)

    async def _finish(self, stream: ModelStream, inbound: Inbound, replies: list[Reply], *, applied: bool) -> None:
        await self.sink(inbound, replies)
        stream.finished(inbound, applied=applied)

    # ------------------------------------------------------------------ gap timeouts, idle persistence
    async def _tick_forever(self) -> None:
        config = self.runtime.config
        period = min(1.0, max(0.01, config.gap_timeout_s / 4), max(0.05, config.marker_interval_s / 2))
        while True:
            await asyncio.sleep(period)
            try:
                errors = await self.expire_gaps()
                self.maintain()
                self._offload_due()
            except Exception as exc:  # never let one bad round stop the timers of every model
                log.exception("gap timer / maintenance round failed")
                errors = [f"{exc!r}"]
            self.maintenance_error = "; ".join(errors)[:500] or None

    async def expire_gaps(self, *, now: bool = False) -> list[str]:
        """Void seq_ids missing for longer than the gap timeout (`now`: all of them); the voids take their place.
        One model's failure is logged and returned, never allowed to keep the others waiting."""
        errors = []
        for stream in list(self.streams.values()):
            try:
                actions = stream.expire_gaps(now=now)
            except Exception as exc:
                log.exception("gap timeout of model %s failed", stream.model_id)
                errors.append(f"model {stream.model_id}: {exc!r}")
                continue
            if actions:
                await self._carry_out(stream, actions)
        return errors

    async def end_of_log(self) -> None:
        """A replay read its whole log: what is still missing never comes, so void it as the gap timeout would."""
        await self.expire_gaps(now=True)

    def maintain(self) -> None:
        """Snapshots and markers that fell due while a model was idle (time-based, or after a failed write)."""
        for model_id, stream in self.streams.items():
            if not self._lanes[model_id].draining and self.recovery.due(stream):
                self._schedule(stream, maintenance=True)

    # ------------------------------------------------------------------ idle lifecycle (residency.py)
    def _offload_due(self) -> None:
        if not self.recovery.persist:  # a replay keeps everything: it writes no snapshots to reload from
            return
        if self.residency.session_expiry_s and time.monotonic() - self._sessions_checked > SESSION_CHECK_S:
            self._sessions_checked = time.monotonic()
            self._spawn(self._check_sessions(), "trainer-session-expiry")
        for model_id in self.residency.due(session_of_model):
            if model_id not in self._offloading and model_id in self.streams:
                self._offloading.add(model_id)
                self._spawn(self._offload(model_id), f"trainer-offload-{model_id}")

    async def _offload(self, model_id: str) -> None:
        await self.offload(model_id)

    async def _check_sessions(self) -> None:
        registry = self.runtime.storage.registry
        sessions = self.residency.sessions_to_check(session_of_model)
        found = await self.runtime.io(lambda: [(s, getattr(registry.get_session(s), "last_heartbeat", None))
                                               for s in sessions])
        self.residency.sessions_seen(found, time.time())

    async def offload(self, model_id: str) -> bool:
        """Drop a quiet model from memory once S3 holds all of it (its last snapshot or marker is written first);
        its next event restores it. False (and it stays) when it is busy, or got an event meanwhile."""
        try:
            stream, lane = self.streams.get(model_id), self._lanes.get(model_id)
            if stream is None or lane is None or not quiet(stream, lane.scheduled(), lane.draining):
                return False
            lane.draining = True  # events arriving while its last state is written wait on the lane
            try:
                await self.recovery.final_persist(stream)
                await self.recovery.wait_writes([model_id], self.runtime.config.release_timeout_s)
            finally:
                lane.draining = False
            if self.streams.get(model_id) is not stream or not quiet(stream, lane.scheduled(), False) \
                    or not durable(stream):
                self._schedule(stream)
                return False
            await self._forget(model_id)
            self.residency.offloads += 1
            log.info("offloaded idle model %s (step %s); its next event reloads it from its snapshot", model_id,
                     stream.state.step if stream.state else None)
            return True
        finally:
            self._offloading.discard(model_id)

    # ------------------------------------------------------------------ apply
    def _schedule(self, stream: ModelStream, maintenance: bool = False) -> None:
        lane = self._lanes[stream.model_id]
        if lane.draining or stream.phase is not Phase.ACTIVE or not (lane.ready or maintenance):
            return
        lane.draining = True
        lane.task = self._spawn(self._drain(stream, lane), f"trainer-model-{stream.model_id}")

    async def _drain(self, stream: ModelStream, lane: _Lane) -> None:
        # The previous event's reply is published while the next event computes: the compute thread does not wait
        # for a broker round trip between two steps of a model (docs/benchmarks.md, issue 14). At most one reply is
        # in flight, and it is settled before the next event is reported applied and before any snapshot or marker,
        # so every state transition happens in the order it did when each reply was awaited at once.
        publishing: asyncio.Task[None] | None = None
        try:
            while stream.phase is Phase.ACTIVE:
                if lane.ready:
                    action = lane.ready.popleft()
                    lane.current = action.inbound
                    try:
                        publishing = await self._apply(stream, action, publishing)
                    finally:
                        lane.current = None
                if publishing is not None and (not lane.ready or self.recovery.due(stream)):
                    await publishing  # its finish may queue late actions: the loop looks at the lane again
                    publishing = None
                await self.recovery.persist_if_due(stream)
                if not lane.ready and publishing is None:
                    break
        except Exception as exc:  # the sink failed (Kafka down...): the worker must stop, not lose replies
            log.exception("model %s stopped", stream.model_id)
            self.failure = exc
        finally:
            if publishing is not None:  # only when stopping on a failure or a cancel: no reply may be left behind
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await publishing
            lane.draining = False

    async def _apply(self, stream: ModelStream, action: Ready,
                     publishing: asyncio.Task[None] | None) -> asyncio.Task[None] | None:
        """Apply `action` (its compute overlapping the previous reply's publish); returns its own reply's publish,
        still in flight."""
        inbound = action.inbound
        if isinstance(action, Void):
            if publishing is not None:
                await publishing
            late = stream.void(action)
            await self._finish(stream, inbound, [], applied=True)
            await self._carry_out(stream, late)
            return None
        before = lasting_key(stream.state)
        started = time.time()  # the reply's started_at: queue vs compute in the session trace
        outcome = await self._run_op(stream, inbound)
        if publishing is not None:
            await publishing
        reply = make_result(inbound.env, *outcome, started_at=started)
        late = stream.applied(inbound, reply, before)
        return asyncio.create_task(self._finish_applied(stream, inbound, reply, late),
                                   name=f"trainer-reply-{inbound.env.request_id}")

    async def _finish_applied(self, stream: ModelStream, inbound: Inbound, reply: Reply, late: list[Action]) -> None:
        await self._finish(stream, inbound, [reply], applied=True)
        await self._carry_out(stream, late)

    async def _run_op(self, stream: ModelStream, inbound: Inbound) -> tuple[msgspec.Struct | None,
                                                                              p.ErrorInfo | None]:
        env = inbound.env
        try:
            handler = HANDLERS.get(env.type)
            if handler is None:
                raise UserError(f"{env.type.value} is not a training request")
            return await handler(self.runtime, stream, inbound, inbound.payload), None
        except Exception as exc:
            error = error_info(exc)
            expected = isinstance(exc, (ServiceError, *USER_ERRORS))
            log.log(logging.INFO if error.category == "user" else logging.ERROR, "%s seq %s of %s failed: %s",
                    env.type.value, env.seq_id, env.model_id, error.message, exc_info=not expected)
            return None, error

    # ------------------------------------------------------------------ handing partitions over
    async def release(self, partitions: set[Partition] | None = None) -> None:
        """Stop applying events of the models on `partitions` (None: all), let running steps finish (up to
        release_timeout_s), and snapshot what can be: the next owner then replays as little as possible. Their
        holds stay until `drop()`, so the commit that follows is exact."""
        timeout = self.runtime.config.release_timeout_s
        streams = [s for s in self.streams.values() if partitions is None or s.partition in partitions]
        for stream in streams:
            stream.stop()
        busy: dict[asyncio.Task, ModelStream] = {}
        for stream in streams:
            task = self._lanes[stream.model_id].task
            if task is not None and not task.done():
                busy[task] = stream
        abandoned: set[str] = set()
        if busy:
            _, late = await asyncio.wait(busy, timeout=timeout)
            for task in late:  # a step longer than the timeout: abandon it (its event stays uncommitted)
                task.cancel()
                abandoned.add(busy[task].model_id)  # its state may be half-updated: never snapshot it
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for stream in streams:
                    if stream.model_id not in abandoned:
                        await self.recovery.final_persist(stream)
        await self.recovery.wait_writes([s.model_id for s in streams], timeout)

    async def _forget(self, model_id: str) -> None:
        lane = self._lanes.pop(model_id)
        if lane.task is not None and not lane.task.done():
            lane.task.cancel()
        self.recovery.cancel_write(model_id)
        del self.streams[model_id]
        self.residency.forget(model_id)
        # No-op for a model without adapter; queued behind any step of it still on the compute thread.
        await self.runtime.compute(self.runtime.backend.remove_adapter, model_id)

    async def drop(self, partitions: set[Partition] | None = None) -> None:
        """Forget the models on `partitions` (after `release()` and the commit): their next owner restores them."""
        for model_id, stream in list(self.streams.items()):
            if partitions is None or stream.partition in partitions:
                await self._forget(model_id)
        log.info("released models on %s", "all partitions" if partitions is None else sorted(partitions))
