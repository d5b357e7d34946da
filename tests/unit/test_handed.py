"""The trainer's ledger of requests taken from its intake door (trainer_consumer/handed.py): only the next offset
of a partition is taken, its fetched copy is skipped, and a copy that differs from what was handed stops the
trainer."""

from __future__ import annotations

import pytest

from bus_runtime.doors import BusRecord
from trainer_consumer.handed import HandedMismatch, HandedRecords

TOPIC = "tinker-bus.train"


def handed(offset: int, value: bytes = b"request", partition: int = 1) -> BusRecord:
    return BusRecord(value, [], TOPIC, partition, offset, b"model")


def test_only_the_next_offset_of_a_read_partition_is_taken():
    ledger = HandedRecords()
    assert not ledger.take(handed(5), None)  # the partition is not read here (or paused, or nothing fetched yet)
    assert not ledger.take(handed(6), 5)  # one is missing in between: the fetch brings both, in order
    assert not ledger.take(handed(4), 5)  # already read
    assert ledger.take(handed(5), 5)
    assert (ledger.taken, ledger.passed, len(ledger)) == (1, 3, 1)


def test_the_fetched_copy_of_a_taken_record_is_skipped_and_others_are_not():
    ledger = HandedRecords()
    ledger.take(handed(5), 5)
    assert not ledger.fetched(TOPIC, 1, 4, b"earlier")
    assert ledger.fetched(TOPIC, 1, 5, b"request")
    assert not ledger.fetched(TOPIC, 1, 5, b"request")  # skipped once: a re-delivery goes to the engine again
    assert len(ledger) == 0


def test_a_handed_record_the_log_does_not_hold_stops_the_trainer():
    ledger = HandedRecords()
    ledger.take(handed(5, b"forged"), 5)
    with pytest.raises(HandedMismatch, match=r"tinker-bus.train\[1\]@5 is not the log's record"):
        ledger.fetched(TOPIC, 1, 5, b"request")


def test_a_revoked_partition_owes_nothing():
    ledger = HandedRecords()
    ledger.take(handed(5, partition=1), 5)
    ledger.take(handed(9, partition=2), 9)
    ledger.forget({(TOPIC, 1)})
    assert not ledger.fetched(TOPIC, 1, 5, b"anything")  # its next owner reads it from the log
    assert ledger.fetched(TOPIC, 2, 9, b"request")
