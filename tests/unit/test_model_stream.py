"""ModelStream.accept and friends: the per-model scheduling decisions, without S3, torch or an event loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bus_events import MAX_SEQ_AHEAD, EventType, make_event, make_result
from bus_events import payloads as p
from trainer_consumer.actions import AnswerDuplicate, AnswerStale, Apply, Finish, Hold, Void
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.durability import DurablePoint
from trainer_consumer.inbound import BusPosition, Inbound
from trainer_consumer.model_state import ModelState, lasting_key
from trainer_consumer.sequencer import Sequencer
from trainer_consumer.stream import ModelStream, Phase

MODEL = "s:train:0"


def stream(max_results: int = 4, gap_timeout_s: float = 30.0) -> ModelStream:
    return ModelStream(MODEL, Sequencer(gap_timeout_s), max_results)


def event(seq_id: int | None, kind: EventType = EventType.GET_INFO, payload: object = None,
          offset: int | None = None, request_id: str | None = None) -> Inbound:
    body = payload if payload is not None else p.GetInfo()
    extra = {"request_id": request_id} if request_id else {}
    env, body = make_event(kind, body, model_id=MODEL, seq_id=seq_id, **extra)  # type: ignore[arg-type]
    return Inbound(env, body, BusPosition("train", 0, offset) if offset is not None else None)


def void(seq_id: int, reason: str = "rejected") -> Inbound:
    return event(seq_id, EventType.SEQ_VOID, p.SeqVoid(reason=reason))


def reply_to(inbound: Inbound):
    return make_result(inbound.env, p.ModelInfo(model_id=MODEL, base_model="b", lora_rank=4, train_attn=True,
                                                train_mlp=True, train_unembed=True))


def state() -> ModelState:
    return ModelState(model_id=MODEL, tenant="default",
                      spec=AdapterSpec(base_model="b", lora=p.LoraSpec(rank=4, seed=1)))


def test_in_order_events_apply_at_once_and_early_ones_wait_for_the_gap():
    s = stream()
    e0, e1, e2 = event(0), event(1), event(2)
    assert s.accept(e0) == [Apply(e0)]
    assert s.accept(e2) == []  # seq 1 is missing
    assert s.accept(e1) == [Apply(e1), Apply(e2)]


def test_events_without_seq_id_apply_in_arrival_order():
    s = stream()
    a, b = event(None), event(None)
    assert s.accept(a) == [Apply(a)]
    assert s.accept(b) == [Apply(b)]


def test_a_duplicate_of_an_answered_seq_id_gets_the_first_reply_under_both_request_ids():
    s = stream()
    first = event(0)
    s.accept(first)
    reply = reply_to(first)
    assert s.applied(first, reply, lasting_key(s.state)) == []
    again = event(0)
    [action] = s.accept(again)
    assert isinstance(action, AnswerDuplicate) and action.inbound is again
    assert [env.request_id for env, _ in action.replies] == [first.env.request_id, again.env.request_id]
    assert all(body.result == reply[1].result for _, body in action.replies)


def test_a_duplicate_of_a_running_seq_id_waits_and_is_answered_when_the_first_is():
    s = stream()
    first, again = event(0), event(0, request_id=None)
    s.accept(first)
    assert s.accept(again) == []
    [action] = s.applied(first, reply_to(first), lasting_key(s.state))
    assert isinstance(action, AnswerDuplicate) and action.inbound is again


def test_a_seq_id_too_old_for_the_cache_is_answered_stale_not_applied():
    s = stream(max_results=1)
    e0, e1 = event(0), event(1)
    for e in (e0, e1):
        s.accept(e)
        s.applied(e, reply_to(e), lasting_key(s.state))
    [action] = s.accept(event(0))
    assert isinstance(action, AnswerStale) and "no longer cached" in action.message


def test_a_seq_void_takes_its_place_and_a_late_copy_of_that_seq_id_is_stale_with_the_reason():
    s = stream()
    v = void(0, reason="invalid data")
    [action] = s.accept(v)
    assert isinstance(action, Void) and "invalid data" in action.reason and action.category == "user"
    assert s.void(action) == []
    s.finished(v, applied=True)
    [late] = s.accept(event(0))
    assert isinstance(late, AnswerStale) and "invalid data" in late.message and "not applied" in late.message


def test_a_seq_void_loses_to_its_event_and_one_without_seq_id_is_ignored():
    s = stream()
    e0 = event(0)
    s.accept(e0)
    v = void(0)
    assert s.accept(v) == [Finish(v)]
    loose = event(None, EventType.SEQ_VOID, p.SeqVoid(reason="x"))
    assert s.accept(loose) == [Finish(loose)]


def test_expired_gaps_become_server_voids_ahead_of_what_waited():
    s = stream(gap_timeout_s=0.0)
    e2 = event(2)
    assert s.accept(e2) == []
    actions = s.expire_gaps()
    assert [type(a) for a in actions] == [Void, Apply]  # one void for the whole gap, at the gap's last seq_id
    assert [a.inbound.env.seq_id for a in actions] == [1, 2]
    assert actions[0].span == range(0, 2) and actions[0].category == "server"
    assert "seq_ids 0..1 (2)" in actions[0].reason and "gap timeout" in actions[0].reason


def test_a_huge_gap_costs_one_void_and_a_jump_past_the_bound_is_refused():
    s = stream(gap_timeout_s=0.0)
    s.state = state()
    far = event(MAX_SEQ_AHEAD)
    assert s.accept(far) == []  # at the bound: it waits for the gap
    [refused] = s.accept(event(MAX_SEQ_AHEAD + 1_000_000))
    assert isinstance(refused, AnswerStale) and f"more than {MAX_SEQ_AHEAD} ahead" in refused.message
    [gap, applied] = s.expire_gaps()
    assert isinstance(gap, Void) and gap.span == range(0, MAX_SEQ_AHEAD) and applied == Apply(far)
    s.void(gap)
    assert s.state.last_applied_seq_id == MAX_SEQ_AHEAD - 1 and s.state.window_failure is not None
    [late] = s.accept(event(12345))
    assert isinstance(late, AnswerStale) and f"seq_ids 0..{MAX_SEQ_AHEAD - 1}" in late.message


def test_a_void_poisons_the_gradient_window_and_counts_as_a_lasting_change():
    s = stream()
    s.state = state()
    v = void(0)
    [action] = s.accept(v)
    assert isinstance(action, Void)
    s.void(action)
    assert s.state.window_failure is not None and s.state.last_applied_seq_id == 0
    assert s.durability.dirty


def test_while_restoring_events_are_held_and_accepted_in_arrival_order_afterwards():
    s = stream()
    s.begin_restore()
    e1, e0 = event(1, offset=11), event(0, offset=10)
    assert s.accept(e1) == [Hold(e1)] and s.accept(e0) == [Hold(e0)]
    assert s.phase is Phase.RESTORING and s.partition == ("train", 0)
    assert s.end_restore() == [Apply(e0), Apply(e1)]  # e1 waited for e0 in the sequencer
    assert s.phase is Phase.ACTIVE and s.held == []


def test_after_a_restore_covered_events_finish_silently_and_the_order_continues_after_the_point():
    s = stream()
    s.begin_restore()
    s.restored(state(), DurablePoint(last_seq=1, max_offset=11), "v-1")
    assert s.end_restore() == []
    covered = event(1, offset=11)
    assert s.accept(covered) == [Finish(covered, owed=False)]
    retry = event(1, offset=30)  # the same seq_id sent again later: not covered, already applied
    assert isinstance(s.accept(retry)[0], AnswerStale)
    nxt = event(2, offset=31)
    assert s.accept(nxt) == [Apply(nxt)]


def test_a_stop_during_a_restore_is_not_undone_when_the_restore_ends():
    s = stream()
    s.begin_restore()
    e0 = event(0)
    s.accept(e0)
    s.stop()
    assert s.end_restore() == [Apply(e0)]  # still sorted, but the engine applies nothing while STOPPING
    assert s.phase is Phase.STOPPING


def test_the_scheduler_imports_no_torch():
    code = "import sys, trainer_consumer.stream; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0
