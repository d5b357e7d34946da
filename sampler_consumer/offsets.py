"""Which offset each partition may commit: just below the oldest record not yet answered."""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def received(self, partition: TopicPartition, offset: int) -> None:
        self._pending.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: TopicPartition, offset: int) -> None:
        self._pending.get(partition, set()).discard(offset)

    def commit_positions(self) -> dict[TopicPartition, int]:
        """Partitions whose committable position moved since the last successful commit."""
        out = {}
        for partition, next_offset in self._next.items():
            pending = self._pending.get(partition)
            position = min(pending) if pending else next_offset
            if self._committed.get(partition) != position:
                out[partition] = position
        return out

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        self._committed.update(positions)
