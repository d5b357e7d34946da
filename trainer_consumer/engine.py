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

The engine knows nothing of Kafka: the worker feeds it `Inbound`s and passes a sink that publishes replies. The
sink is awaited exactly once per Inbound (with no replies for seq_void), which is when its offset may be committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

from bus_events import Envelope, EventType, make_event, make_result, new_id
from bus_events import payloads as p
from trainer_consumer import ops_checkpoints, ops_training
from trainer_consumer.errors import USER_ERRORS, TrainerError, UserError, error_info
from trainer_consumer.model_state import WindowFailure
from trainer_consumer.runtime import Runtime
from trainer_consumer.sequencer import Sequencer
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


def replies_for_duplicate(first: Reply, duplicate: Envelope) -> list[Reply]:
    """The first reply again, and under the duplicate's own request_id when that differs."""
    replies = [first]
    if duplicate.request_id != first[0].request_id:
        body = first[1]
        replies.append(make_result(duplicate, body.result, body.error))
    return replies


class TrainerEngine:
    def __init__(self, runtime: Runtime, sink: Sink):
        self.runtime = runtime
        self.sink = sink
        self.streams: dict[str, ModelStream] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="trainer-gap-timer")

    async def stop(self) -> None:
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
        env = inbound.env
        stream = self._stream(env.model_id)
        is_void = env.type == EventType.SEQ_VOID
        if env.seq_id is None:
            if is_void:
                log.warning("seq_void without seq_id for %s ignored", env.model_id)
                await self.sink(inbound, [])
                return
            stream.enqueue([inbound])
            self._schedule(stream)
            return
        seq_id = env.seq_id
        if seq_id in stream.results or seq_id in stream.pending:
            if is_void:  # the event itself got here: it wins over a void for its seq_id
                log.warning("seq_void for seq %d of %s ignored: that event arrived", seq_id, env.model_id)
                await self.sink(inbound, [])
            elif seq_id in stream.results:
                await self.sink(inbound, replies_for_duplicate(stream.results[seq_id], env))
            else:
                log.info("duplicate %s seq %d of %s waits for the first one", env.type, seq_id, env.model_id)
                stream.pending[seq_id].append(inbound)
            return
        released = stream.sequencer.offer(seq_id, inbound)
        if released is None:
            if is_void:
                await self.sink(inbound, [])
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
        await self.sink(inbound, [make_result(inbound.env, error=p.ErrorInfo(message=message, category="user"))])

    # ------------------------------------------------------------------ gap timeouts
    async def _tick_forever(self) -> None:
        period = min(1.0, max(0.01, self.runtime.config.gap_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            self.expire_gaps()

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
    def _schedule(self, stream: ModelStream) -> None:
        if stream.running or not stream.ready:
            return
        stream.running = True
        task = asyncio.create_task(self._drain(stream), name=f"trainer-model-{stream.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, stream: ModelStream) -> None:
        try:
            while stream.ready:
                inbound = stream.ready.popleft()
                if inbound.env.type == EventType.SEQ_VOID:
                    await self._apply_void(stream, inbound)
                else:
                    await self._apply(stream, inbound)
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
        if stream.state is not None and voided_type in (None, "", EventType.FORWARD_BACKWARD.value):
            stream.state.poison_window(WindowFailure(f"seq_id {seq_id}", reason, category))
        if stream.state is not None:
            stream.state.last_applied_seq_id = seq_id
        waiting = stream.pending.pop(seq_id, [])
        await self.sink(inbound, [])
        for late in waiting:
            await self._answer_stale(stream, late)

    async def _apply(self, stream: ModelStream, inbound: Inbound) -> None:
        env = inbound.env
        result: msgspec.Struct | None = None
        error: p.ErrorInfo | None = None
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
        duplicates = stream.remember(env.seq_id, reply) if env.seq_id is not None else []
        await self.sink(inbound, [reply])
        for duplicate in duplicates:
            await self.sink(duplicate, replies_for_duplicate(reply, duplicate.env))
