"""OffsetTracker: commit up to the lowest unfinished offset of a partition, never past a caller's hold."""

from __future__ import annotations

from aiokafka import TopicPartition

from bus_runtime.offsets import OffsetTracker

TP = TopicPartition("t", 0)
OTHER = TopicPartition("t", 1)


def test_commit_stops_at_the_lowest_unfinished_offset():
    tracker = OffsetTracker()
    for offset in (5, 6, 7):
        tracker.received(TP, offset)
    tracker.finished(TP, 6)
    assert tracker.to_commit() == {TP: 5}
    tracker.finished(TP, 5)
    assert tracker.to_commit() == {TP: 7}
    tracker.finished(TP, 7)
    assert tracker.to_commit() == {TP: 8}


def test_a_hold_keeps_the_commit_below_it_and_committed_offsets_are_not_repeated():
    tracker = OffsetTracker()
    tracker.received(TP, 5)
    tracker.finished(TP, 5)
    assert tracker.to_commit(holds={TP: 3}) == {TP: 3}
    tracker.committed({TP: 3})
    assert tracker.to_commit(holds={TP: 3}) == {}
    assert tracker.to_commit() == {TP: 6}


def test_only_limits_the_partitions_and_forget_drops_them():
    tracker = OffsetTracker()
    tracker.received(TP, 1)
    tracker.received(OTHER, 2)
    tracker.finished(TP, 1)
    tracker.finished(OTHER, 2)
    assert tracker.to_commit(only={OTHER}) == {OTHER: 3}
    tracker.forget({TP})
    tracker.finished(TP, 9)  # a late completion of a revoked partition is ignored
    assert tracker.to_commit() == {OTHER: 3}
