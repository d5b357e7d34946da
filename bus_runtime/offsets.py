"""Which offsets a consumer may commit: per partition, up to (not including) the lowest offset whose event is
not finished yet, and not past a caller's hold (the trainer holds the lowest offset some model still needs re-read,
see trainer_consumer/durability.py). An event is finished once it is answered (applied and replied,
dead-lettered, or answered as a duplicate). So a crash re-delivers every unanswered event, and nothing older."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class PartitionOffsets:
    unfinished: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset received
    committed: int | None = None

    def committable(self) -> int | None:
        return min(self.unfinished) if self.unfinished else self.next_offset


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def received(self, tp: TopicPartition, offset: int) -> None:
        part = self._partitions.setdefault(tp, PartitionOffsets())
        part.unfinished.add(offset)
        part.next_offset = max(part.next_offset or 0, offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        part = self._partitions.get(tp)
        if part is not None:  # a revoked partition is forgotten; its late completions do not matter here
            part.unfinished.discard(offset)

    def to_commit(self, only: set[TopicPartition] | None = None,
                  holds: dict[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
        out = {}
        for tp, part in self._partitions.items():
            if only is not None and tp not in only:
                continue
            offset = part.committable()
            hold = (holds or {}).get(tp)
            if hold is not None:
                offset = hold if offset is None else min(offset, hold)
            if offset is not None and (part.committed is None or offset > part.committed):
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def partition(self, tp: TopicPartition) -> PartitionOffsets | None:
        """Where `tp` stands (read-only use: the trainer's lag metrics)."""
        return self._partitions.get(tp)

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._partitions.pop(tp, None)
