"""One model's scheduler: decides, for every event of the model, what happens to it (actions.py), and keeps the
model's ordering, dedupe and recovery bookkeeping. Pure: no I/O, no torch, no asyncio; the engine carries the
actions out and reports back (`applied`, `void`, `finished`).

Per model (never across models):
- ORDER: events are released strictly in seq_id order. Early arrivals wait in the sequencer (the SDK posts chunk 1
  of a chunked forward_backward last); a `seq_void` consumes a seq_id; the seq_ids still missing `gap_timeout_s`
  after a later one arrived are declared void together (`expire_gaps`: one Void for the whole range, so a gap of
  2**62 costs what a gap of 1 costs), which poisons the gradient window (see ops/training.py for the
  window-failure rule). A seq_id more than `MAX_SEQ_AHEAD` past the model's next one is refused outright (it would
  only open a gap nobody fills). Events without seq_id are released in arrival order.
- IDEMPOTENCY: a duplicate (model_id, seq_id) is never applied twice. It is answered with the first reply (plus a
  copy under the duplicate's request_id if that differs), at once if the first is done, else as soon as it is.
  Duplicates of seq_ids too old for the result cache get a clear error.
- RECOVERY: while the model's snapshot is read (phase RESTORING) arrivals are held; afterwards re-read events the
  snapshot covers are finished silently.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from bus_events import MAX_SEQ_AHEAD, Envelope, EventType, Reply, make_event, make_result, new_id
from bus_events import payloads as p
from bus_runtime.errors import Category
from trainer_consumer.actions import Action, AnswerDuplicate, AnswerStale, Apply, Finish, Hold, Ready, Void
from trainer_consumer.durability import Durability, DurablePoint
from trainer_consumer.inbound import Inbound
from trainer_consumer.model_state import ModelState, WindowFailure, lasting_key
from trainer_consumer.sequencer import Sequencer

log = logging.getLogger(__name__)

# Events that create or replace the model's state: snapshotted at once.
NEW_STATE_EVENTS = frozenset({EventType.CREATE_MODEL, EventType.LOAD_WEIGHTS, EventType.UNLOAD_MODEL})


class Phase(enum.Enum):
    RESTORING = "restoring"  # its snapshot is being read: arrivals are held, in arrival order
    ACTIVE = "active"  # events are accepted and applied in order
    STOPPING = "stopping"  # its partition is being handed over: events are still sorted, nothing more is applied


def describe_seq_ids(seq_ids: range) -> str:
    """`seq_id 7`, or `seq_ids 7..9 (3)` for a range (never a list: a range may hold 2**62 ids)."""
    if len(seq_ids) == 1:
        return f"seq_id {seq_ids[0]}"
    return f"seq_ids {seq_ids[0]}..{seq_ids[-1]} ({len(seq_ids)})"


def replies_for_duplicate(first: Reply, duplicate: Envelope) -> list[Reply]:
    """The first reply again, and under the duplicate's own request_id when that differs."""
    replies = [first]
    if duplicate.request_id != first[0].request_id:
        body = first[1]
        replies.append(make_result(duplicate, body.result, body.error))
    return replies


@dataclass(eq=False)
class ModelStream:
    model_id: str
    sequencer: Sequencer[Inbound]
    max_results: int  # replies kept to answer duplicates (and void reasons kept to explain late events)
    phase: Phase = Phase.ACTIVE
    state: ModelState | None = None
    # Why the model cannot be served here (its snapshot names a base model this trainer lacks...), if so: its ops
    # fail with this message. A fact about the model, not a scheduling state: its events are still ordered.
    unavailable: str | None = None
    # seq_ids accepted but not yet answered (buffered, queued or running), with duplicates waiting on them.
    pending: dict[int, list[Inbound]] = field(default_factory=dict)
    results: OrderedDict[int, Reply] = field(default_factory=OrderedDict)
    # The last `max_results` voided seq_id ranges and why, newest last (to explain late events).
    voided: deque[tuple[range, str, Category]] = field(default_factory=deque)
    # The (topic, partition) its events come from (all of a model's events share its key's partition).
    partition: tuple[str, int] | None = None
    held: list[Inbound] = field(default_factory=list)  # arrivals while RESTORING
    # Set when restored: re-read events it covers were applied and answered before, and are skipped silently.
    covered: DurablePoint | None = None
    durability: Durability = field(default_factory=Durability)

    # ------------------------------------------------------------------ intake
    def accept(self, inbound: Inbound) -> list[Action]:
        """What to do with an arriving event: answer it now, and/or the events it releases in order."""
        position = inbound.position
        if position is not None and self.partition is None:
            self.partition = (position.topic, position.partition)
        if self.phase is Phase.RESTORING:
            self.held.append(inbound)
            return [Hold(inbound)]
        env = inbound.env
        if self.covered is not None and position is not None and self.covered.covers(env.seq_id, position.offset):
            return [Finish(inbound, owed=False)]  # applied and answered before the restore: nothing owed
        is_void = env.type == EventType.SEQ_VOID
        if env.seq_id is None:
            if is_void:
                log.warning("seq_void without seq_id for %s ignored", env.model_id)
                return [Finish(inbound)]
            return [Apply(inbound)]
        seq_id = env.seq_id
        if seq_id in self.results or seq_id in self.pending:
            if is_void:  # the event itself got here: it wins over a void for its seq_id
                log.warning("seq_void for seq %d of %s ignored: that event arrived", seq_id, env.model_id)
                return [Finish(inbound)]
            if seq_id in self.results:
                return [AnswerDuplicate(inbound, replies_for_duplicate(self.results[seq_id], env))]
            log.info("duplicate %s seq %d of %s waits for the first one", env.type, seq_id, env.model_id)
            self.pending[seq_id].append(inbound)
            return []
        if seq_id - self.sequencer.next_seq > MAX_SEQ_AHEAD:
            if is_void:
                return [Finish(inbound)]
            return [AnswerStale(inbound, f"seq_id {seq_id} is more than {MAX_SEQ_AHEAD} ahead of model "
                                         f"{env.model_id}'s next seq_id {self.sequencer.next_seq}; not applied")]
        released = self.sequencer.offer(seq_id, inbound)
        if released is None:
            return [Finish(inbound)] if is_void else [self._stale(inbound)]
        if is_void:
            reason = getattr(inbound.payload, "reason", "") or "rejected before reaching the trainer"
            self._remember_void(range(seq_id, seq_id + 1), f"seq_id {seq_id} was voided: {reason}", "user")
        self.pending[seq_id] = []
        return list(self._ready(released))

    def expire_gaps(self, *, now: bool = False) -> list[Action]:
        """Void the seq_ids missing for longer than the gap timeout (`now`: whatever their age, the log is over);
        the voids take their place in the order and release what waited behind them."""
        missing, released = self.sequencer.expire(now=now)
        if not missing:
            return []
        timeout = self.sequencer.gap_timeout_s
        what = describe_seq_ids(missing)
        log.error("model %s: %s never arrived within %.1f s; declared void, %d waiting event(s) go on",
                  self.model_id, what, timeout, len(released))
        why = "before the end of the log" if now else f"within the {timeout:g} s gap timeout"
        reason = f"{what} never arrived {why} and {'was' if len(missing) == 1 else 'were'} declared void"
        self._remember_void(missing, reason, "server")
        # One void stands for the whole range: it carries the range's last seq_id, the one the model is at after it.
        env, payload = make_event(EventType.SEQ_VOID, p.SeqVoid(reason="gap timeout"), model_id=self.model_id,
                                  seq_id=missing[-1], request_id=new_id("gap"))
        return [Void(Inbound(env, payload), reason, "server", span=missing), *self._ready(released)]

    def _ready(self, items: list[Inbound]) -> list[Ready]:
        out: list[Ready] = []
        for item in items:
            seq_id = item.env.seq_id
            if item.env.type == EventType.SEQ_VOID and seq_id is not None:
                reason, category = self.void_reason(seq_id) or (f"seq_id {seq_id} was voided", "user")
                out.append(Void(item, reason, category))
            else:
                out.append(Apply(item))
        return out

    def _stale(self, inbound: Inbound) -> AnswerStale:
        env = inbound.env
        void = self.void_reason(env.seq_id) if env.seq_id is not None else None
        if void is not None:
            message = f"{void[0]}; this late {env.type.value} was not applied"
        else:
            message = (f"seq_id {env.seq_id} of model {env.model_id} was already applied and its result is no "
                       f"longer cached (the last {self.max_results} are); it was not applied again")
        return AnswerStale(inbound, message)

    def _remember_void(self, seq_ids: range, reason: str, category: Category) -> None:
        self.voided.append((seq_ids, reason, category))
        while len(self.voided) > self.max_results:
            self.voided.popleft()

    def void_reason(self, seq_id: int) -> tuple[str, Category] | None:
        """Why `seq_id` was voided, if it is among the remembered voids (the newest that covers it)."""
        for seq_ids, reason, category in reversed(self.voided):
            if seq_id in seq_ids:
                return reason, category
        return None

    # ------------------------------------------------------------------ outcomes reported by the engine
    def applied(self, inbound: Inbound, reply: Reply, before: tuple) -> list[Action]:
        """Its op ran (`before`: lasting_key(state) before it): record what lasts, cache the reply, and answer the
        duplicates that waited for it."""
        env = inbound.env
        if self.state is not None and env.seq_id is not None:
            self.state.last_applied_seq_id = env.seq_id
        if self.state is not None and lasting_key(self.state) != before:
            self.durability.lasting_effect(optim_step=env.type == EventType.OPTIM_STEP and reply[1].error is None,
                                           new_state=env.type in NEW_STATE_EVENTS)
        if env.seq_id is None:
            return []
        self.results[env.seq_id] = reply
        while len(self.results) > self.max_results:
            self.results.popitem(last=False)
        waiting = self.pending.pop(env.seq_id, [])
        return [AnswerDuplicate(late, replies_for_duplicate(reply, late.env)) for late in waiting]

    def void(self, action: Void) -> list[Action]:
        """Take the void's place in the order: a void that may have been a forward_backward poisons the window.
        Returns the stale answers of events of that seq_id that waited."""
        inbound = action.inbound
        seq_id = inbound.env.seq_id
        assert seq_id is not None
        voided_type = inbound.voided_type or getattr(inbound.payload, "request_type", None)
        state = self.state
        if state is not None:
            before = lasting_key(state)
            if voided_type in (None, "", EventType.FORWARD_BACKWARD.value):
                what = describe_seq_ids(action.span or range(seq_id, seq_id + 1))
                state.poison_window(WindowFailure(what, action.reason, action.category))
            state.last_applied_seq_id = seq_id
            if lasting_key(state) != before:
                self.durability.lasting_effect()
        return [self._stale(late) for late in self.pending.pop(seq_id, [])]

    def finished(self, inbound: Inbound, *, applied: bool) -> None:
        """The event was answered: it is owed until the model's next snapshot or marker captures it."""
        position = inbound.position
        self.durability.finished(inbound.env.seq_id, position.offset if position else None, applied=applied,
                                 holds=self.state is not None)

    # ------------------------------------------------------------------ phases
    def begin_restore(self) -> None:
        self.phase = Phase.RESTORING

    def restored(self, state: ModelState, point: DurablePoint, snapshot_version: str) -> None:
        """The snapshot is installed: continue after the point it covers."""
        state.last_applied_seq_id = point.last_seq
        self.state = state
        if point.last_seq is not None:
            self.sequencer.next_seq = point.last_seq + 1
        self.covered = point
        self.durability = Durability.restored(point, snapshot_version)

    def end_restore(self) -> list[Action]:
        """The restore is over: the held events are accepted now, in the order they arrived."""
        if self.phase is Phase.RESTORING:
            self.phase = Phase.ACTIVE
        held, self.held = self.held, []
        return [action for inbound in held for action in self.accept(inbound)]

    def stop(self) -> None:
        self.phase = Phase.STOPPING
