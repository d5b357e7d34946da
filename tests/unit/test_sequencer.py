"""Sequencer: strict seq_id order per model, whatever the arrival order; gaps expire after the timeout."""

from __future__ import annotations

from trainer_consumer.sequencer import Sequencer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_out_of_order_arrivals_are_released_in_seq_id_order():
    seq: Sequencer[str] = Sequencer(gap_timeout_s=5.0)
    assert seq.offer(2, "c") == []
    assert seq.offer(1, "b") == []
    assert seq.buffered == 2
    assert seq.offer(0, "a") == ["a", "b", "c"]
    assert seq.next_seq == 3 and seq.buffered == 0


def test_a_seq_id_already_released_or_buffered_is_refused():
    seq: Sequencer[str] = Sequencer(gap_timeout_s=5.0)
    assert seq.offer(0, "a") == ["a"]
    assert seq.offer(0, "again") is None  # released before
    assert seq.offer(2, "c") == []
    assert seq.offer(2, "c again") is None  # waiting in the buffer


def test_a_gap_expires_only_after_the_timeout_and_releases_what_waited():
    clock = Clock()
    seq: Sequencer[str] = Sequencer(gap_timeout_s=5.0, clock=clock)
    seq.offer(2, "c")
    seq.offer(3, "d")
    clock.now = 4.9
    assert seq.expire() == (range(0), [])
    clock.now = 5.0
    assert seq.expire() == (range(0, 2), ["c", "d"])
    assert seq.next_seq == 4
    assert seq.offer(1, "late") is None  # a voided seq_id never comes back


def test_progress_restarts_the_gap_clock():
    clock = Clock()
    seq: Sequencer[str] = Sequencer(gap_timeout_s=5.0, clock=clock)
    seq.offer(1, "b")
    seq.offer(3, "d")
    clock.now = 4.0
    assert seq.offer(0, "a") == ["a", "b"]  # the gap before 3 is new from now on
    clock.now = 8.0
    assert seq.expire() == (range(0), [])
    clock.now = 9.0
    assert seq.expire() == (range(2, 3), ["d"])


def test_expire_now_ignores_the_timeout_and_nothing_buffered_means_nothing_missing():
    seq: Sequencer[str] = Sequencer(gap_timeout_s=1e9)
    assert seq.expire(now=True) == (range(0), [])
    seq.offer(2, "c")
    assert seq.expire(now=True) == (range(0, 2), ["c"])
