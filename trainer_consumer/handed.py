"""Requests a gateway handed over through the trainer's intake door (bus_runtime/doors.py), until their copies are
fetched from the log.

A handed record is taken only if it is the very next offset of a partition this trainer reads (so the records of a
partition still enter the engine in log order, whichever way each came), and its fetched copy is then dropped. It
is checked first: the log is the source of truth, so a handed record that is not byte for byte the log's record at
that offset (a forged or broken one) stops the trainer, whose successor restores from snapshots and the log.
"""

from __future__ import annotations

from bus_runtime.doors import BusRecord


class HandedMismatch(RuntimeError):
    """A record taken from the intake door differs from the log's record at its offset."""


class HandedRecords:
    def __init__(self) -> None:
        self._taken: dict[tuple[str, int, int], BusRecord] = {}
        self.taken = 0  # handed records taken in
        self.passed = 0  # handed records left to the fetch: not next in line, or a partition not read here now

    def take(self, record: BusRecord, next_offset: int | None) -> bool:
        """Whether to take `record` in now: only when it is `next_offset`, the next record its partition owes this
        trainer (None: the partition is not read here, or is paused, or nothing of it was fetched yet)."""
        if next_offset is None or record.offset != next_offset:
            self.passed += 1
            return False
        self._taken[(record.topic, record.partition, record.offset)] = record
        self.taken += 1
        return True

    def fetched(self, topic: str, partition: int, offset: int, value: bytes | None) -> bool:
        """True when the fetched record at this offset was taken from the door already (so it is skipped).
        Raises HandedMismatch when the two differ."""
        handed = self._taken.pop((topic, partition, offset), None)
        if handed is None:
            return False
        if handed.value != value:
            raise HandedMismatch(f"the record handed through the intake door as {topic}[{partition}]@{offset} is "
                                 "not the log's record at that offset; stopping, so that the next trainer rebuilds "
                                 "its models from snapshots and the log")
        return True

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """A revoked partition's records are re-read by its next owner: nothing handed of it is owed any more."""
        self._taken = {key: record for key, record in self._taken.items() if key[:2] not in partitions}

    def __len__(self) -> int:
        return len(self._taken)
