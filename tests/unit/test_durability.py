"""Durability: what a model still owes the log (the commit hold) between two snapshots or markers."""

from __future__ import annotations

import time

from trainer_consumer.durability import Durability, DurablePoint


def test_events_hold_their_lowest_offset_until_a_capture_is_written():
    d = Durability()
    d.finished(0, 10, applied=True, holds=True)
    d.finished(1, 12, applied=True, holds=True)
    assert d.effective_hold() == 10
    capture = d.capture("marker")
    assert d.effective_hold() == 10  # still owed while the upload runs
    d.finished(2, 13, applied=True, holds=True)
    d.written(capture, None)
    assert d.effective_hold() == 13 and d.point == DurablePoint(1, 12, None)


def test_events_of_a_model_that_does_not_exist_hold_nothing():
    d = Durability()
    d.finished(0, 10, applied=True, holds=False)  # e.g. a get_info before create_model: nothing to re-read
    assert d.effective_hold() is None and d.max_offset == 10


def test_a_failed_write_owes_everything_again_and_a_snapshot_is_due_again():
    d = Durability()
    d.finished(0, 10, applied=True, holds=True)
    d.lasting_effect(new_state=True)
    assert d.snapshot_due(every_steps=10, interval_s=60)
    capture = d.capture("snapshot")
    assert not d.dirty and not d.snapshot_due(every_steps=10, interval_s=60)  # one write at a time
    d.failed(capture)
    assert d.dirty and d.effective_hold() == 10 and d.snapshot_due(every_steps=10, interval_s=60)


def test_a_snapshot_falls_due_after_enough_optimizer_steps():
    d = Durability()
    for _ in range(2):
        d.lasting_effect(optim_step=True)
    assert not d.snapshot_due(every_steps=3, interval_s=0)
    d.lasting_effect(optim_step=True)
    assert d.snapshot_due(every_steps=3, interval_s=0)


def _after_one_snapshot(monkeypatch, took_s: float) -> tuple[Durability, list[float]]:
    """A model whose first snapshot write took `took_s` on a clock the test moves (clock[0])."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    d = Durability()
    d.lasting_effect(optim_step=True)
    capture = d.capture("snapshot")
    clock[0] += took_s
    d.written(capture, "v-1")
    return d, clock


def test_step_count_snapshots_keep_their_writes_to_a_share_of_the_time(monkeypatch):
    d, clock = _after_one_snapshot(monkeypatch, took_s=2.0)
    for _ in range(3):
        d.lasting_effect(optim_step=True)
    assert d.snapshot_due(every_steps=3, interval_s=0)  # no bound asked for
    assert not d.snapshot_due(every_steps=3, interval_s=0, write_share=0.1)  # 2 s of writing: wait 18 s
    clock[0] += 17.9
    assert not d.snapshot_due(every_steps=3, interval_s=0, write_share=0.1)
    clock[0] += 0.2
    assert d.snapshot_due(every_steps=3, interval_s=0, write_share=0.1)


def test_new_states_and_the_time_trigger_are_not_held_back_by_the_write_share(monkeypatch):
    d, clock = _after_one_snapshot(monkeypatch, took_s=5.0)
    d.lasting_effect(new_state=True)  # e.g. load_weights: snapshot at once
    assert d.snapshot_due(every_steps=10, interval_s=0, write_share=0.1)
    d.written(d.capture("snapshot"), "v-2")
    d.lasting_effect(optim_step=True)
    clock[0] += 60.0
    assert d.snapshot_due(every_steps=10, interval_s=60, write_share=0.01)  # a minute after the first change


def test_a_marker_needs_a_snapshot_and_no_lasting_change():
    d = Durability()
    d.finished(0, 10, applied=True, holds=True)
    assert not d.marker_due(min_interval_s=0.0)  # no snapshot to build on
    d = Durability.restored(DurablePoint(0, 10, None), "v-1")
    d.finished(1, 11, applied=True, holds=True)
    assert d.marker_due(min_interval_s=0.0)
    d.lasting_effect()
    assert not d.marker_due(min_interval_s=0.0)  # only a snapshot can cover a lasting change


def test_covers_tells_a_re_read_event_from_a_later_retry():
    point = DurablePoint(last_seq=4, max_offset=20, unsequenced_offset=15)
    assert point.covers(4, 20)
    assert not point.covers(4, 21)  # a later copy of seq 4: a client retry, answered as a duplicate
    assert not point.covers(5, 19)
    assert point.covers(None, 15) and not point.covers(None, 16)
    assert not point.covers(3, None)
